// What every script shares: the official OpenAI Node SDK pointed at the server under test
// (tests/test_compat_node.py passes CVI_BASE_URL and CVI_API_KEY), and how results are printed.
import OpenAI from 'openai';

export function makeClient(apiKey = process.env.CVI_API_KEY) {
  return new OpenAI({ baseURL: process.env.CVI_BASE_URL, apiKey, maxRetries: 0, timeout: 20_000 });
}

export const client = makeClient();

// One JSON object on stdout: what the client saw, for the Python test to assert.
export function report(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
}

// A streamed answer reassembled the way an application would.
export async function collect(stream) {
  const out = { text: '', calls: [], finish: null, usage: null, chunks: 0, ids: new Set(), fingerprints: new Set(), roles: [] };
  for await (const chunk of stream) {
    out.chunks += 1;
    out.ids.add(chunk.id);
    out.fingerprints.add(chunk.system_fingerprint ?? null);
    if (chunk.usage) out.usage = chunk.usage;
    for (const choice of chunk.choices) {
      const delta = choice.delta ?? {};
      if (delta.role) out.roles.push(delta.role);
      if (delta.content) out.text += delta.content;
      for (const tc of delta.tool_calls ?? []) {
        const call = (out.calls[tc.index] ??= { id: '', name: '', arguments: '' });
        if (tc.id) call.id = tc.id;
        if (tc.function?.name) call.name = tc.function.name;
        call.arguments += tc.function?.arguments ?? '';
      }
      if (choice.finish_reason) out.finish = choice.finish_reason;
    }
  }
  return { ...out, ids: [...out.ids], fingerprints: [...out.fingerprints] };
}

export function describeError(err) {
  return {
    class: err?.constructor?.name,
    status: err?.status ?? null,
    code: err?.code ?? null,
    type: err?.type ?? null,
    param: err?.param ?? null,
    requestID: err?.requestID ?? null,
  };
}

export { OpenAI };
