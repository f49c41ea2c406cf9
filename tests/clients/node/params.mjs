// Parameters the upstream brain does not interpret reach the upstream as sent.
import { client, report } from './client.mjs';

const completion = await client.chat.completions.create({
  model: 'storyteller',
  messages: [{ role: 'user', content: 'Answer in JSON.' }],
  response_format: {
    type: 'json_schema',
    json_schema: { name: 'story', strict: true, schema: { type: 'object', properties: { title: { type: 'string' } } } },
  },
  seed: 11,
  stop: ['END'],
  top_p: 0.9,
});
report({ content: completion.choices[0].message.content });
