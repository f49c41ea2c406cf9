// Abort mid-stream: the SDK's controller closes the connection; the server must close the
// upstream request at once (the Python test watches the fake upstream).
import { client, report } from './client.mjs';

const stream = await client.chat.completions.create({
  model: 'storyteller',
  stream: true,
  messages: [{ role: 'user', content: 'a very long story' }],
});
const seen = [];
let error = null;
try {
  for await (const chunk of stream) {
    seen.push(chunk.choices[0]?.delta?.content ?? '');
    if (seen.length === 3) stream.controller.abort();
  }
} catch (err) {
  error = err?.constructor?.name ?? String(err);
}
report({ seen, error, abortedAt: Date.now() / 1000 });
