// Client tools: a call streamed back, its result sent in the next request (a round trip), and
// tool_choice none / required / a named function. The concierge needs no model; `weather`
// goes to the fake upstream, whose plans the Python test pushed.
import { client, collect, report } from './client.mjs';

const weatherTool = {
  type: 'function',
  function: {
    name: 'get_current_weather',
    description: 'Get the current weather in a given location.',
    parameters: { type: 'object', properties: { location: { type: 'string' } }, required: ['location'] },
  },
};
const ask = (model, messages, extra = {}) =>
  client.chat.completions.create({ model, stream: true, messages, tools: [weatherTool], ...extra }).then(collect);

async function roundTrip(model, question) {
  const messages = [{ role: 'user', content: question }];
  const first = await ask(model, messages);
  const call = first.calls[0];
  messages.push({
    role: 'assistant',
    content: first.text || null,
    tool_calls: [{ id: call.id, type: 'function', function: { name: call.name, arguments: call.arguments } }],
  });
  messages.push({ role: 'tool', tool_call_id: call.id, content: JSON.stringify({ summary: '21 degrees and clear' }) });
  const second = await ask(model, messages);
  return { first, second };
}

const question = [{ role: 'user', content: "What's the weather in Paris?" }];
report({
  flow: await roundTrip('concierge', "What's the weather in Paris?"),
  upstream: await roundTrip('weather', 'Weather in Oslo?'),
  none: await ask('concierge', question, { tool_choice: 'none' }),
  required: await ask('concierge', [{ role: 'user', content: 'hello' }], { tool_choice: 'required' }),
  named: await ask('concierge', [{ role: 'user', content: 'What time is it in Asia/Tokyo?' }], {
    tool_choice: { type: 'function', function: { name: 'get_current_weather' } },
  }),
  undeclared: await client.chat.completions
    .create({ model: 'concierge', stream: true, messages: question })
    .then(collect),
});
