// Models view: every instance, its layers as one bar coloured by node, state, speed and queue.
import { useState } from 'preact/hooks';
import { html } from './html.js';
import { request } from './api.js';
import { bytes, layers, nodeColours, seconds, tokPerSec } from './format.js';

/** One segment per stage, as wide as its share of the layers; a legend names each segment. */
export function PlacementBar({ stages, layerCount, colours }) {
  if (!stages.length) return html`<p class="muted">No placement yet.</p>`;
  const total = layerCount || stages.reduce((n, s) => Math.max(n, s.lastLayer + 1), 0) || 1;
  const text = stages.map((s, i) => `stage ${i}: ${s.nodeName} layers ${layers(s.firstLayer, s.lastLayer)}`).join('; ');
  return html`
    <div class="placement" role="img" aria-label=${`placement: ${text}`}>
      ${stages.map(
        (s, i) => html`<div class="segment" data-stage=${i} data-node=${s.nodeName} data-first=${s.firstLayer} data-last=${s.lastLayer}
          style=${{ flexGrow: Math.max(1, s.lastLayer - s.firstLayer + 1) / total, background: colours.get(s.nodeName) }}>
          <span>${s.nodeName} ${layers(s.firstLayer, s.lastLayer)}</span></div>`,
      )}
    </div>
    <ol class="stage-list" start="0">
      ${stages.map((s) => html`<li><span class="swatch" style=${{ background: colours.get(s.nodeName) }}></span>
        ${s.nodeName}: layers ${layers(s.firstLayer, s.lastLayer)}, ${bytes(s.totalBytes)} of ${bytes(s.budgetBytes)}</li>`)}
    </ol>`;
}

function Progress({ progress }) {
  if (!progress) return '';
  const value = progress.bytesTotal > 0 ? Math.round((100 * progress.bytesDone) / progress.bytesTotal) : undefined;
  return html`<div class="progress">
    <label>${progress.phase}: ${progress.message}
      <progress max="100" value=${value}>${value ?? ''}</progress></label>
  </div>`;
}

function ModelCard({ model, colours, admin, onError }) {
  const [busy, setBusy] = useState(false);
  const unload = async () => {
    setBusy(true);
    try {
      await request(`/v1/cluster/models/${encodeURIComponent(model.name)}`, { method: 'DELETE' });
    } catch (err) {
      onError(`unload ${model.name}: ${err.message}`);
    } finally {
      setBusy(false);
    }
  };
  return html`
    <li class="card model-card" data-model=${model.name} data-state=${model.state}>
      <div class="card-head">
        <h3>${model.name}</h3>
        <span class=${`badge state-${model.state}`} data-field="state">${model.state}</span>
      </div>
      <p class="muted">${model.engine} · ${model.path} · ctx ${model.ctx} · KV ${model.cacheType} · ${model.parallel} slot${model.parallel === 1 ? '' : 's'}</p>
      ${model.error ? html`<p class="error" data-field="reason" role="status">${model.error}</p>` : ''}
      <${Progress} progress=${model.progress} />
      <${PlacementBar} stages=${model.stages} layerCount=${model.layerCount} colours=${colours} />
      <dl class="figures">
        <div><dt>predicted</dt><dd>${tokPerSec(model.predictedTokensPerSecond)}</dd></div>
        <div><dt>measured</dt><dd data-field="measured">${tokPerSec(model.measuredTokensPerSecond)}</dd></div>
        <div><dt>TTFT p50</dt><dd data-field="ttft-p50">${seconds(model.ttftP50Seconds)}</dd></div>
        <div><dt>in flight</dt><dd data-field="running">${model.running}</dd></div>
        <div><dt>queued</dt><dd>${model.queued}</dd></div>
      </dl>
      ${admin ? html`<button type="button" class="danger" onClick=${unload} disabled=${busy}>Unload ${model.name}</button>` : ''}
    </li>`;
}

export function ModelsView({ snapshot, admin, onError }) {
  const models = snapshot?.models ?? [];
  const colours = nodeColours((snapshot?.nodes ?? []).map((n) => n.name));
  return html`
    <section aria-labelledby="models-h">
      <h2 id="models-h">Models</h2>
      ${models.length === 0 ? html`<p>No model is loaded.${admin ? ' Use Load to place one.' : ''}</p>` : ''}
      <ul class="cards wide">${models.map((m) => html`<${ModelCard} key=${m.name} model=${m} colours=${colours} admin=${admin} onError=${onError} />`)}</ul>
    </section>`;
}
