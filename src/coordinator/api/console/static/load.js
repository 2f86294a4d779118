// Load view: pick a model file, see the plan `orchard plan` would print, load with progress.
import { useEffect, useState } from 'preact/hooks';
import { html } from './html.js';
import { getJson, readSse, request } from './api.js';
import { bandwidth, bytes, layers, tokPerSec } from './format.js';

const CACHE_TYPES = ['f16', 'q8_0', 'q4_0', 'f32', 'bf16'];

/** The same columns as `orchard plan`, or "does not fit" with the shortfall and the remedies. */
export function PlanTable({ plan }) {
  if (!plan.fits) {
    return html`<div class="plan nofit" role="status" data-fits="false">
      <h3>Does not fit</h3>
      ${plan.shortfall?.shortfallBytes > 0 ? html`<p>Shortfall: <strong>${bytes(plan.shortfall.shortfallBytes)}</strong></p>` : ''}
      <ul>${(plan.reasons ?? []).map((r) => html`<li>${r}</li>`)}</ul>
      ${plan.remedies?.length ? html`<h4>Remedies</h4><ul class="remedies">${plan.remedies.map((r) => html`<li>${r}</li>`)}</ul>` : ''}
    </div>`;
  }
  const head = ['stage', 'node', 'role', 'layers', 'weights', 'KV', 'compute', 'overhead', 'total', 'budget', 'headroom', 'bandwidth'];
  return html`<div class="plan" data-fits="true">
    <table>
      <caption>Plan: ${tokPerSec(plan.predicted.tokensPerSecond)} predicted</caption>
      <thead><tr>${head.map((c) => html`<th scope="col">${c}</th>`)}</tr></thead>
      <tbody>${plan.stages.map(
        (s, i) => html`<tr data-node=${s.node} data-first=${s.firstLayer} data-last=${s.lastLayer} data-total=${s.bytes.total}>
          <td>${i}</td><td>${s.node}</td><td>${s.role}</td><td>${layers(s.firstLayer, s.lastLayer)}</td>
          <td>${bytes(s.bytes.weights)}</td><td>${bytes(s.bytes.kv)}</td><td>${bytes(s.bytes.compute)}</td><td>${bytes(s.bytes.overhead)}</td>
          <td>${bytes(s.bytes.total)}</td><td>${bytes(s.budgetBytes)}</td><td>${bytes(s.headroomBytes)}</td><td>${bandwidth(s.bandwidthBytesPerSecond)}</td></tr>`,
      )}</tbody>
    </table>
    ${plan.reasons?.length ? html`<ul class="muted">${plan.reasons.map((r) => html`<li>${r}</li>`)}</ul>` : ''}
  </div>`;
}

function bodyOf(f) {
  return {
    model: f.model.trim(),
    ...(f.name.trim() ? { name: f.name.trim() } : {}),
    ctx: Number(f.ctx),
    cache_type: f.cacheType,
    parallel: Number(f.parallel),
  };
}

/** POST /v1/cluster/models as SSE: progress messages, then `done` or an error object. */
async function loadWithProgress(body, onProgress) {
  const res = await request('/v1/cluster/models', { method: 'POST', body, accept: 'text/event-stream' });
  let result;
  await readSse(res, (_event, data) => {
    if (data === '[DONE]') return;
    const m = JSON.parse(data);
    if (m.error) throw new Error(m.error.message);
    if (m.phase === 'done') result = m.model;
    else onProgress(m);
  });
  if (!result) throw new Error('the load ended without a result');
  return result;
}

function LoadProgress({ progress }) {
  const value = progress.bytes_total > 0 ? Math.round((100 * progress.bytes_done) / progress.bytes_total) : undefined;
  return html`<div class="progress" role="status">
    <label>${progress.phase}: ${progress.message}
      <progress max="100" value=${value}>${value ?? ''}</progress></label>
  </div>`;
}

export function LoadView({ admin }) {
  const [form, setForm] = useState({ model: '', name: '', ctx: '4096', cacheType: 'f16', parallel: '1' });
  const [files, setFiles] = useState([]);
  const [plan, setPlan] = useState(undefined);
  const [progress, setProgress] = useState(undefined);
  const [status, setStatus] = useState({ text: '', error: false });
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    getJson('/v1/console/model-files').then((r) => setFiles(r.files), () => setFiles([]));
  }, []);
  const field = (k) => (e) => setForm({ ...form, [k]: e.currentTarget.value });
  const act = (what) => async (e) => {
    e.preventDefault();
    setBusy(true);
    setStatus({ text: '', error: false });
    try {
      if (what === 'plan') setPlan((await getJson('/v1/console/plan', { method: 'POST', body: bodyOf(form) })).plan);
      else {
        setProgress({ phase: 'starting', message: 'sending the load request', bytes_done: 0, bytes_total: 0 });
        const m = await loadWithProgress(bodyOf(form), setProgress);
        setStatus({ text: `${m.id} is ready`, error: false });
      }
    } catch (err) {
      setStatus({ text: err.message, error: true });
    } finally {
      setBusy(false);
      if (what === 'load') setProgress(undefined);
    }
  };
  return html`
    <section aria-labelledby="load-h">
      <h2 id="load-h">Load a model</h2>
      <form class="load-form" onSubmit=${act('plan')}>
        <label>Model file (GGUF path on the head node)
          <input name="model" required list="model-files" value=${form.model} onInput=${field('model')} placeholder="/path/to/model.gguf" /></label>
        <datalist id="model-files">${files.map((f) => html`<option value=${f.path}>${f.node} · ${bytes(f.sizeBytes)}</option>`)}</datalist>
        <label>Name (optional)<input name="name" value=${form.name} onInput=${field('name')} /></label>
        <label>Context (tokens)<input name="ctx" type="number" min="16" value=${form.ctx} onInput=${field('ctx')} /></label>
        <label>KV cache type
          <select name="cacheType" value=${form.cacheType} onChange=${field('cacheType')}>${CACHE_TYPES.map((c) => html`<option value=${c}>${c}</option>`)}</select></label>
        <label>Parallel slots<input name="parallel" type="number" min="1" max="256" value=${form.parallel} onInput=${field('parallel')} /></label>
        <div class="actions">
          <button type="submit" disabled=${busy}>Preview plan</button>
          ${admin ? html`<button type="button" class="primary" disabled=${busy || !form.model} onClick=${act('load')}>Load</button>` : ''}
        </div>
      </form>
      ${progress ? html`<${LoadProgress} progress=${progress} />` : ''}
      <p class=${status.error ? 'error' : 'ok'} role="status" aria-live="polite">${status.text}</p>
      ${plan ? html`<${PlanTable} plan=${plan} />` : ''}
    </section>`;
}
