import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { DEMO_CTX, demoBudgets, ensureDemoModel } from '../../src/cli/demo-model.ts';
import { type LocalCluster, startLocalCluster } from '../../src/cli/local-cluster.ts';
import { describeWith, llamaEngines, SHARED_CACHE } from '../helpers/needs.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { freePort } from '../helpers/processes.ts';

/*
 * The OpenAI-compatible API against a real cluster: a coordinator and two `orchard node` child
 * processes (memory limits force a two-stage llama.cpp RPC split) on a generated GGUF, driven
 * with the official `openai` package. One cluster for the whole file; afterAll stops it and
 * the reference llama-server even when a test fails.
 */

const engines = await llamaEngines();
const env: NodeJS.ProcessEnv = { ...process.env, ORCHARD_CACHE_DIR: SHARED_CACHE };

const API_KEY = 'test-key-0123';
const MODEL = 'tiny';
const MAX_BODY = 64 * 1024;
const MAX_QUEUE = 4;

let tmp = '';
let modelPath = '';
let cluster: LocalCluster | undefined;
let reference: ChildProcess | undefined;
let referenceUrl = '';
let client: OpenAI;
let base = '';

async function waitHealthy(url: string, timeoutMs: number): Promise<void> {
  const t0 = Date.now();
  for (;;) {
    try {
      if ((await fetch(`${url}/health`)).ok) return;
    } catch {}
    if (Date.now() - t0 > timeoutMs) throw new Error(`${url} not healthy`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const auth = { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' };

async function post(path: string, body: string, headers: Record<string, string> = auth): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${base}${path}`, { method: 'POST', headers, body });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

describeWith([engines], 'OpenAI API on a 2-stage cluster', () => {
  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'orchard-openai-'));
    modelPath = (await ensureDemoModel(env)).path;
    const profile = modelProfile(await readGgufHeader(modelPath));
    const budgets = demoBudgets(profile, 2, { ctx: DEMO_CTX, cacheType: 'f16' });
    cluster = await startLocalCluster({
      nodes: budgets,
      stateRoot: join(tmp, 'state'),
      env: { ...env, ORCHARD_RPC_THREADS: '1', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1' },
      coordinatorArgs: ['--api-key', API_KEY, '--max-body', String(MAX_BODY), '--max-queue', String(MAX_QUEUE)],
    });
    base = cluster.httpUrl;
    // Wait for both nodes, then load with 2 slots.
    for (let i = 0; i < 100; i++) {
      const c = (await (await fetch(`${base}/v1/cluster`, { headers: auth })).json()) as { nodes: { state: string }[] };
      if (c.nodes.filter((n) => n.state === 'up').length === 2) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const load = await post('/v1/cluster/models', JSON.stringify({ model: modelPath, name: MODEL, ctx: DEMO_CTX, parallel: 2 }));
    expect(load.status, JSON.stringify(load.json)).toBe(200);
    client = new OpenAI({ baseURL: `${base}/v1`, apiKey: API_KEY, maxRetries: 0 });

    // The oracle: a plain llama-server on the same file, same context, one thread.
    if (!engines.ok) throw new Error('unreachable: the suite is skipped without engines');
    const bins = engines.value;
    const port = await freePort();
    reference = spawn(bins.llamaServer, ['-m', modelPath, '--host', '127.0.0.1', '--port', String(port), '-c', String(DEMO_CTX), '-np', '1', '-t', '1', '--no-webui'], {
      stdio: 'ignore',
      detached: true,
    });
    referenceUrl = `http://127.0.0.1:${port}`;
    await waitHealthy(referenceUrl, 60_000);
  });

  afterAll(async () => {
    if (reference?.pid && reference.exitCode === null) {
      try {
        process.kill(-reference.pid, 'SIGKILL');
      } catch {}
    }
    await cluster?.stop();
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('lists the model with its placement over two nodes', async () => {
    const list = await client.models.list();
    const m = list.data.find((x) => x.id === MODEL) as unknown as { id: string; orchard: { state: string; stages: { node: string; first_layer: number; last_layer: number }[] } };
    expect(m).toBeDefined();
    expect(m.orchard.state).toBe('ready');
    expect(m.orchard.stages).toHaveLength(2);
    expect(new Set(m.orchard.stages.map((s) => s.node)).size).toBe(2);
    expect(m.orchard.stages[0]!.first_layer).toBe(0);
    expect(m.orchard.stages[1]!.first_layer).toBe(m.orchard.stages[0]!.last_layer + 1);
    const one = await client.models.retrieve(MODEL);
    expect(one.id).toBe(MODEL);
  });

  it('greedy completion equals a plain llama-server on the same file (non-stream and stream)', async () => {
    const prompt = 'The quick brown fox';
    const ref = (await (
      await fetch(`${referenceUrl}/completion`, { method: 'POST', body: JSON.stringify({ prompt, n_predict: 24, temperature: 0, top_k: 1 }) })
    ).json()) as { content: string; tokens_predicted: number };
    const r = await client.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0 });
    expect(r.object).toBe('text_completion');
    expect(r.choices[0]!.text).toBe(ref.content);
    expect(r.choices[0]!.finish_reason).toBe('length');
    expect(r.usage!.completion_tokens).toBe(24);
    expect(r.usage!.prompt_tokens).toBeGreaterThan(0);
    expect(r.usage!.total_tokens).toBe(r.usage!.prompt_tokens + 24);

    const stream = await client.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0, stream: true, stream_options: { include_usage: true } });
    let text = '';
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined | null;
    for await (const c of stream) {
      if (c.choices[0]) {
        text += c.choices[0].text;
        finish = c.choices[0].finish_reason ?? finish;
      }
      if (c.usage) usage = c.usage;
    }
    expect(text).toBe(ref.content);
    expect(finish).toBe('length');
    expect(usage?.completion_tokens).toBe(24);
  });

  it('greedy chat equals llama-server’s own chat endpoint (same template), streamed and not', async () => {
    const messages = [
      { role: 'system' as const, content: 'You are terse.' },
      { role: 'user' as const, content: 'Name a colour.' },
    ];
    const ref = (await (
      await fetch(`${referenceUrl}/v1/chat/completions`, { method: 'POST', body: JSON.stringify({ messages, max_tokens: 16, temperature: 0, top_k: 1 }) })
    ).json()) as { choices: { message: { content: string } }[]; usage: { prompt_tokens: number } };
    const r = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 16, temperature: 0 });
    expect(r.object).toBe('chat.completion');
    expect(r.choices[0]!.message.role).toBe('assistant');
    expect(r.choices[0]!.message.content).toBe(ref.choices[0]!.message.content);
    expect(r.usage!.prompt_tokens).toBe(ref.usage.prompt_tokens);
    expect(r.choices[0]!.finish_reason).toBe('length');

    const stream = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 16, temperature: 0, stream: true });
    let text = '';
    let role: string | undefined;
    let finish: string | null = null;
    for await (const c of stream) {
      role ??= c.choices[0]?.delta.role;
      text += c.choices[0]?.delta.content ?? '';
      finish = c.choices[0]?.finish_reason ?? finish;
    }
    expect(role).toBe('assistant');
    expect(text).toBe(r.choices[0]!.message.content);
    expect(finish).toBe('length');
  });

  it('logprobs in OpenAI’s shapes equal a plain llama-server’s n_probs (completions and chat, streamed and not)', async () => {
    const prompt = 'The quick brown fox';
    type Prob = { id: number; token: string; bytes: number[]; logprob: number; top_logprobs: { token: string; logprob: number }[] };
    const ref = (await (
      await fetch(`${referenceUrl}/completion`, { method: 'POST', body: JSON.stringify({ prompt, n_predict: 8, temperature: 0, top_k: 1, n_probs: 3 }) })
    ).json()) as { completion_probabilities: Prob[] };
    const want = ref.completion_probabilities;
    expect(want).toHaveLength(8);
    // A 2-stage RPC split computes the same graph in a different order of kernels: the ids are
    // identical, the logprobs differ by float noise (measured up to ~2e-3 on this flat
    // distribution of logprobs around -6), never by a different distribution.
    const close = (got: number | undefined, exp: number) => expect(Math.abs((got ?? Number.NaN) - exp)).toBeLessThan(1e-2);

    const r = await client.completions.create({ model: MODEL, prompt, max_tokens: 8, temperature: 0, logprobs: 3 });
    const lp = r.choices[0]!.logprobs!;
    expect(lp.tokens).toEqual(want.map((w) => w.token));
    want.forEach((w, i) => {
      close(lp.token_logprobs![i], w.logprob);
    });
    want.forEach((w, i) => {
      expect(Object.keys(lp.top_logprobs![i]!).sort()).toEqual([...new Set([...w.top_logprobs.map((t) => t.token), w.token])].sort());
    });
    expect(lp.text_offset![0]).toBe(0);
    expect(lp.text_offset![1]).toBe(want[0]!.token.length);

    const streamed: { token: string; logprob: number }[] = [];
    for await (const c of await client.completions.create({ model: MODEL, prompt, max_tokens: 8, temperature: 0, logprobs: 0, stream: true })) {
      const l = c.choices[0]?.logprobs;
      if (l) l.tokens!.forEach((token, i) => {
        streamed.push({ token, logprob: l.token_logprobs![i]! });
      });
    }
    expect(streamed.map((s) => s.token)).toEqual(want.map((w) => w.token));
    want.forEach((w, i) => {
      close(streamed[i]!.logprob, w.logprob);
    });

    // Chat: the chosen token's logprob, its bytes and top_logprobs alternatives, most likely first.
    const messages = [{ role: 'user' as const, content: 'Name a colour.' }];
    const chat = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 6, temperature: 0, logprobs: true, top_logprobs: 2 });
    const content = chat.choices[0]!.logprobs!.content!;
    expect(content).toHaveLength(6);
    expect(content.map((c) => c.token).join('')).toBe(chat.choices[0]!.message.content);
    for (const c of content) {
      expect(c.top_logprobs).toHaveLength(2);
      // Greedy: the chosen token is the most likely one.
      expect(c.top_logprobs[0]!.token).toBe(c.token);
      close(c.top_logprobs[0]!.logprob, c.logprob);
      expect(c.top_logprobs[1]!.logprob).toBeLessThanOrEqual(c.logprob);
      expect(Buffer.from(c.bytes!).toString('utf8')).toBe(c.token);
    }
    const chunks: OpenAI.ChatCompletionTokenLogprob[] = [];
    for await (const c of await client.chat.completions.create({ model: MODEL, messages, max_tokens: 6, temperature: 0, logprobs: true, stream: true })) {
      chunks.push(...(c.choices[0]?.logprobs?.content ?? []));
    }
    expect(chunks.map((c) => c.token)).toEqual(content.map((c) => c.token));
    chunks.forEach((c, i) => {
      close(c.logprob, content[i]!.logprob);
    });
    expect(chunks.every((c) => c.top_logprobs.length === 0)).toBe(true);
  });

  it('SSE: every event is valid JSON, the final chunk has finish_reason, [DONE] is last', async () => {
    const res = await fetch(`${base}/v1/completions`, {
      method: 'POST',
      headers: auth,
      body: JSON.stringify({ model: MODEL, prompt: 'Hello', max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true } }),
    });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const raw = await res.text();
    expect(raw.endsWith('data: [DONE]\n\n')).toBe(true);
    const events = raw.split('\n\n').filter(Boolean);
    for (const e of events) expect(e.startsWith('data: ')).toBe(true);
    const payloads = events.map((e) => e.slice(6));
    expect(payloads.filter((p) => p === '[DONE]')).toHaveLength(1);
    const chunks = payloads.slice(0, -1).map((p) => JSON.parse(p) as { choices: { finish_reason: string | null }[]; usage?: unknown });
    const withChoice = chunks.filter((c) => c.choices.length > 0);
    expect(withChoice.at(-1)!.choices[0]!.finish_reason).toBe('length');
    expect(withChoice.slice(0, -1).every((c) => c.choices[0]!.finish_reason === null)).toBe(true);
    expect(chunks.at(-1)!.choices).toHaveLength(0);
    expect(chunks.at(-1)!.usage).toMatchObject({ completion_tokens: 8 });
  });

  it('stop sequences end the text before the stop string with finish_reason "stop"', async () => {
    const full = await client.completions.create({ model: MODEL, prompt: 'Once', max_tokens: 16, temperature: 0 });
    const text = full.choices[0]!.text;
    const stop = text.slice(Math.floor(text.length / 2), Math.floor(text.length / 2) + 3);
    expect(stop.length).toBe(3);
    const r = await client.completions.create({ model: MODEL, prompt: 'Once', max_tokens: 16, temperature: 0, stop: [stop] });
    expect(r.choices[0]!.finish_reason).toBe('stop');
    expect(text.startsWith(r.choices[0]!.text)).toBe(true);
    expect(r.choices[0]!.text.includes(stop)).toBe(false);
  });

  it('refuses bad input with OpenAI-shaped errors and the right status', async () => {
    const badJson = await post('/v1/chat/completions', '{"model": "tiny", "messages": [');
    expect(badJson.status).toBe(400);
    expect(badJson.json).toMatchObject({ error: { type: 'invalid_request_error', code: 'invalid_json' } });

    const noMessages = await post('/v1/chat/completions', JSON.stringify({ model: MODEL }));
    expect(noMessages.status).toBe(400);
    expect(noMessages.json).toMatchObject({ error: { param: 'messages' } });

    await expect(client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'hi' }] })).rejects.toMatchObject({
      status: 404,
      code: 'model_not_found',
    });
    await expect(client.completions.create({ model: MODEL, prompt: 'hi', max_tokens: DEMO_CTX + 1 })).rejects.toMatchObject({
      status: 400,
      code: 'context_length_exceeded',
      param: 'max_tokens',
    });
    // A prompt longer than the context: refused by the engine, still a 400 (not a 5xx).
    const long = await post('/v1/completions', JSON.stringify({ model: MODEL, prompt: 'word '.repeat(3000), max_tokens: 4 }));
    expect(long.status).toBe(400);

    const big = await post('/v1/completions', JSON.stringify({ model: MODEL, prompt: 'x'.repeat(MAX_BODY + 10) }));
    expect(big.status).toBe(413);
    expect(big.json).toMatchObject({ error: { code: 'request_too_large' } });

    const noKey = await post('/v1/completions', JSON.stringify({ model: MODEL, prompt: 'hi' }), { 'content-type': 'application/json' });
    expect(noKey.status).toBe(401);
    const wrong = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'wrong', maxRetries: 0 });
    await expect(wrong.models.list()).rejects.toMatchObject({ status: 401, code: 'invalid_api_key' });
    // Health needs no key (probes), and nothing above broke the server.
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
  });

  it('a client that disconnects mid-stream frees its slot within 500 ms', async () => {
    // Fill both slots with long generations, read a few tokens, then drop the connections.
    const controllers = [new AbortController(), new AbortController()];
    await Promise.all(
      controllers.map(async (ac) => {
        const res = await fetch(`${base}/v1/completions`, {
          method: 'POST',
          headers: auth,
          body: JSON.stringify({ model: MODEL, prompt: 'Tell a long story', max_tokens: 600, temperature: 0, stream: true }),
          signal: ac.signal,
        });
        const reader = res.body!.getReader();
        let seen = 0;
        while (seen < 3) {
          const { value } = await reader.read();
          seen += (new TextDecoder().decode(value).match(/data: /g) ?? []).length;
        }
      }),
    );
    const t0 = performance.now();
    for (const ac of controllers) ac.abort();
    // Were the slots still held, these would wait behind ~600 tokens each (many seconds).
    const both = await Promise.all([0, 1].map(() => client.completions.create({ model: MODEL, prompt: 'Hi', max_tokens: 1, temperature: 0 })));
    const ms = performance.now() - t0;
    console.log(`slot-free latency (abort → two 1-token completions done): ${ms.toFixed(0)} ms`);
    for (const r of both) expect(r.usage!.completion_tokens).toBe(1);
    expect(ms).toBeLessThan(1500);
  });

  it('100 concurrent requests against 2 slots: bounded queue, 429s, every accepted request completes', async () => {
    const results = await Promise.all(
      Array.from({ length: 100 }, (_, i) =>
        client.completions.create({ model: MODEL, prompt: `Request ${i}`, max_tokens: 4, temperature: 0 }).then(
          (r) => ({ ok: true as const, r }),
          (err: { status?: number }) => ({ ok: false as const, status: err.status }),
        ),
      ),
    );
    const accepted = results.filter((x) => x.ok);
    const refused = results.filter((x) => !x.ok);
    console.log(`100 concurrent: ${accepted.length} accepted, ${refused.length} refused (429)`);
    expect(refused.every((x) => x.status === 429)).toBe(true);
    expect(refused.length).toBeGreaterThan(0);
    expect(accepted.length).toBeGreaterThanOrEqual(2 + MAX_QUEUE);
    for (const a of accepted) {
      expect(a.r.choices[0]!.finish_reason).toBe('length');
      expect(a.r.usage!.completion_tokens).toBe(4);
    }
    // Still serving.
    const after = await client.completions.create({ model: MODEL, prompt: 'after', max_tokens: 2, temperature: 0 });
    expect(after.usage!.completion_tokens).toBe(2);
  });

  it('management: cluster view, unload, unknown unload is 404', async () => {
    const c = (await (await fetch(`${base}/v1/cluster`, { headers: auth })).json()) as { nodes: unknown[]; models: { id: string }[] };
    expect(c.nodes).toHaveLength(2);
    expect(c.models.map((m) => m.id)).toContain(MODEL);
    const missing = await fetch(`${base}/v1/cluster/models/nope`, { method: 'DELETE', headers: auth });
    expect(missing.status).toBe(404);
    const del = await fetch(`${base}/v1/cluster/models/${MODEL}`, { method: 'DELETE', headers: auth });
    expect(del.status).toBe(200);
    await expect(client.completions.create({ model: MODEL, prompt: 'hi', max_tokens: 1 })).rejects.toMatchObject({ status: 404 });
  });
});
