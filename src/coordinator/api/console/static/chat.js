// Chat playground: stream a reply token by token through the OpenAI API, stop it, time it.
import { useRef, useState } from 'preact/hooks';
import { html } from './html.js';
import { readSse, request } from './api.js';
import { seconds, tokPerSec } from './format.js';

/**
 * Time to first token is measured here, from the click to the first content chunk (network and
 * queue included, as a user feels it); tokens/s counts the usage's completion tokens after the
 * first over the time they took.
 */
async function streamChat(body, signal, onText) {
  const t0 = performance.now();
  let first;
  let last;
  let usage;
  const res = await request('/v1/chat/completions', { method: 'POST', body, accept: 'text/event-stream', signal });
  await readSse(res, (_event, data) => {
    if (data === '[DONE]') return;
    const m = JSON.parse(data);
    if (m.error) throw new Error(m.error.message);
    if (m.usage) usage = m.usage;
    const text = m.choices?.[0]?.delta?.content;
    if (text) {
      last = performance.now();
      first ??= last;
      onText(text, (first - t0) / 1000);
    }
  });
  const n = usage?.completion_tokens ?? 0;
  return { ttft: first === undefined ? null : (first - t0) / 1000, tokPerSec: n > 1 && last > first ? ((n - 1) * 1000) / (last - first) : null, tokens: n };
}

export function ChatView({ snapshot }) {
  const ready = (snapshot?.models ?? []).filter((m) => m.state === 'ready');
  const [model, setModel] = useState('');
  const [prompt, setPrompt] = useState('');
  const [maxTokens, setMaxTokens] = useState('64');
  const [temperature, setTemperature] = useState('0');
  const [reply, setReply] = useState('');
  const [stats, setStats] = useState({ ttft: null, tokPerSec: null, tokens: 0, state: 'idle', error: '' });
  const abort = useRef(undefined);
  const chosen = ready.some((m) => m.name === model) ? model : (ready[0]?.name ?? '');
  const send = async (e) => {
    e.preventDefault();
    const ac = new AbortController();
    abort.current = ac;
    setReply('');
    setStats({ ttft: null, tokPerSec: null, tokens: 0, state: 'streaming', error: '' });
    const body = {
      model: chosen,
      messages: [{ role: 'user', content: prompt }],
      max_tokens: Number(maxTokens),
      temperature: Number(temperature),
      stream: true,
      stream_options: { include_usage: true },
    };
    let text = '';
    try {
      const r = await streamChat(body, ac.signal, (t, ttft) => {
        text += t;
        setReply(text);
        setStats((s) => ({ ...s, ttft }));
      });
      setStats({ ...r, state: 'done', error: '' });
    } catch (err) {
      setStats((s) => ({ ...s, state: ac.signal.aborted ? 'stopped' : 'failed', error: ac.signal.aborted ? '' : err.message }));
    } finally {
      abort.current = undefined;
    }
  };
  const streaming = stats.state === 'streaming';
  return html`
    <section aria-labelledby="chat-h">
      <h2 id="chat-h">Chat</h2>
      ${ready.length === 0 ? html`<p>No model is ready. Load one first.</p>` : ''}
      <form class="chat-form" onSubmit=${send}>
        <label>Model
          <select name="model" value=${chosen} onChange=${(e) => setModel(e.currentTarget.value)}>
            ${ready.map((m) => html`<option value=${m.name}>${m.name}</option>`)}</select></label>
        <label>Max tokens<input name="max_tokens" type="number" min="1" value=${maxTokens} onInput=${(e) => setMaxTokens(e.currentTarget.value)} /></label>
        <label>Temperature<input name="temperature" type="number" min="0" max="2" step="0.1" value=${temperature} onInput=${(e) => setTemperature(e.currentTarget.value)} /></label>
        <label class="full">Message<textarea name="prompt" rows="3" required value=${prompt} onInput=${(e) => setPrompt(e.currentTarget.value)}></textarea></label>
        <div class="actions">
          <button type="submit" class="primary" disabled=${streaming || !chosen}>Send</button>
          <button type="button" disabled=${!streaming} onClick=${() => abort.current?.abort()}>Stop</button>
        </div>
      </form>
      <div class="reply" aria-live="polite" aria-label="reply" data-state=${stats.state}>${reply}</div>
      <dl class="figures">
        <div><dt>time to first token</dt><dd data-field="ttft">${seconds(stats.ttft)}</dd></div>
        <div><dt>speed</dt><dd data-field="tps">${tokPerSec(stats.tokPerSec)}</dd></div>
        <div><dt>tokens</dt><dd>${stats.tokens}</dd></div>
        <div><dt>state</dt><dd data-field="chat-state">${stats.state}</dd></div>
      </dl>
      ${stats.error ? html`<p class="error" role="alert">${stats.error}</p>` : ''}
    </section>`;
}
