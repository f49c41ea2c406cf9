// Plain chat: a stream with usage, a non-streamed answer, the models and request ids.
import { client, collect, report } from './client.mjs';

const user = (content) => [{ role: 'user', content }];

const streamed = await collect(
  await client.chat.completions.create({
    model: 'echo',
    stream: true,
    stream_options: { include_usage: true },
    messages: user('streaming through the node sdk'),
  }),
);

const { data: completion, request_id: requestId } = await client.chat.completions
  .create({ model: 'echo', messages: user('once, not streamed') })
  .withResponse();

const mine = await client.chat.completions.create(
  { model: 'echo', messages: user('traced') },
  { headers: { 'x-request-id': 'node-trace-1' } },
);

const model = await client.models.retrieve('concierge');
const models = [];
for await (const m of client.models.list()) models.push(m.id);

report({
  streamed,
  completion: {
    content: completion.choices[0].message.content,
    finish: completion.choices[0].finish_reason,
    usage: completion.usage,
    fingerprint: completion.system_fingerprint,
    object: completion.object,
  },
  requestId,
  parsedRequestId: completion._request_id,
  echoedRequestId: mine._request_id,
  model: { id: model.id, object: model.object, owned_by: model.owned_by },
  models,
});
