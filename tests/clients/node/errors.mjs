// Errors surface as the SDK's typed errors: 401, 404 (chat and models.retrieve), 400 naming the
// parameter, and an upstream failure as a 5xx the SDK would retry.
import { OpenAI, client, describeError, makeClient, report } from './client.mjs';

async function attempt(fn) {
  try {
    await fn();
    return { class: null };
  } catch (err) {
    return { ...describeError(err), isAPIError: err instanceof OpenAI.APIError };
  }
}

const user = [{ role: 'user', content: 'x' }];
report({
  unauthorized: await attempt(() => makeClient('wrong-key').chat.completions.create({ model: 'echo', messages: user })),
  unknownModel: await attempt(() => client.chat.completions.create({ model: 'ghost', messages: user })),
  retrieveUnknown: await attempt(() => client.models.retrieve('ghost')),
  unsupported: await attempt(() => client.chat.completions.create({ model: 'concierge', messages: user, n: 2 })),
  upstreamDown: await attempt(() => client.chat.completions.create({ model: 'storyteller', messages: user })),
  upstreamDownStreamed: await attempt(() =>
    client.chat.completions.create({ model: 'storyteller', messages: user, stream: true }),
  ),
});
