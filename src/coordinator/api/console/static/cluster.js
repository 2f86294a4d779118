// Cluster view: one card per node — state, chip, memory against budget, wired limit and RAM.
import { html } from './html.js';
import { bandwidth, bytes } from './format.js';

const pct = (part, whole) => (whole > 0 ? Math.min(100, (100 * part) / whole) : 0);

/**
 * The memory bar's scale is the node's RAM. Filled: bytes Orchard's engines hold. Marks: the
 * planner's budget and the GPU wired limit. The figures are printed under the bar as well, so
 * nothing depends on seeing the colours.
 */
function MemoryBar({ node }) {
  const ram = node.memoryBytes;
  const label = `memory: engines use ${bytes(node.usedByEnginesBytes)} of a ${bytes(node.budgetBytes)} budget; wired limit ${bytes(node.wiredLimitBytes)}; RAM ${bytes(ram)}`;
  return html`
    <div class="membar" role="img" aria-label=${label}>
      <div class="membar-budget" style=${{ width: `${pct(node.budgetBytes, ram)}%` }}></div>
      <div class="membar-used" style=${{ width: `${pct(node.usedByEnginesBytes, ram)}%` }}></div>
      <div class="membar-mark budget" style=${{ left: `${pct(node.budgetBytes, ram)}%` }} title="budget"></div>
      <div class="membar-mark wired" style=${{ left: `${pct(node.wiredLimitBytes, ram)}%` }} title="wired limit"></div>
    </div>
    <dl class="figures">
      <div><dt>engines</dt><dd data-field="used">${bytes(node.usedByEnginesBytes)}${node.budgetBytes > 0 ? ` (${Math.round(pct(node.usedByEnginesBytes, node.budgetBytes))}% of budget)` : ''}</dd></div>
      <div><dt>budget</dt><dd data-field="budget">${bytes(node.budgetBytes)}</dd></div>
      <div><dt>wired limit</dt><dd data-field="wired">${bytes(node.wiredLimitBytes)}</dd></div>
      <div><dt>RAM</dt><dd data-field="memory">${bytes(ram)}</dd></div>
      <div><dt>bandwidth</dt><dd data-field="bandwidth">${bandwidth(node.bandwidthBytesPerSecond)}</dd></div>
      <div><dt>available now</dt><dd>${bytes(node.availableBytes)}</dd></div>
    </dl>`;
}

function NodeCard({ node }) {
  return html`
    <li class="card node-card" data-node=${node.name} data-state=${node.state}
        data-memory-bytes=${node.memoryBytes} data-budget-bytes=${node.budgetBytes}
        data-wired-limit-bytes=${node.wiredLimitBytes} data-bandwidth=${node.bandwidthBytesPerSecond}
        data-used-bytes=${node.usedByEnginesBytes}>
      <div class="card-head">
        <h3>${node.name}</h3>
        <span class=${`badge state-${node.state}`} data-field="state">${node.state}</span>
      </div>
      <p class="muted">${node.chip} · ${node.os} · ${node.address}${node.memoryPressure && node.memoryPressure !== 'unknown' ? ` · pressure ${node.memoryPressure}` : ''}</p>
      <${MemoryBar} node=${node} />
    </li>`;
}

/**
 * An agent announced on Bonjour that holds no certificate of this cluster: listed with what it
 * claims (unproven) and how to let it in. Never planned on, so no memory bar.
 */
function DiscoveredCard({ agent }) {
  return html`
    <li class="card node-card discovered" data-node=${agent.name} data-state="discovered" data-address=${agent.address}
        data-claimed-id=${agent.claimedId} data-memory-bytes=${agent.memoryBytes}>
      <div class="card-head">
        <h3>${agent.name}</h3>
        <span class="badge state-discovered" data-field="state">discovered</span>
      </div>
      <p class="muted">${agent.chip || 'chip not announced'} · ${agent.address}${agent.memoryBytes > 0 ? ` · RAM ${bytes(agent.memoryBytes)} (claimed)` : ''}</p>
      <p>Announced on Bonjour, not joined: no certificate of this cluster, so nothing is sent to it and nothing is placed on it.
        Join it with <code>orchard node --token …</code> (<code>orchard coordinator token</code> prints one).</p>
      <p class="muted" data-field="reason">${agent.reason}</p>
    </li>`;
}

export function ClusterView({ snapshot }) {
  const nodes = snapshot?.nodes ?? [];
  const discovered = snapshot?.discovered ?? [];
  const up = nodes.filter((n) => n.state === 'up').length;
  return html`
    <section aria-labelledby="cluster-h">
      <h2 id="cluster-h">Cluster <span class="muted">${up} of ${nodes.length} node${nodes.length === 1 ? '' : 's'} up</span></h2>
      ${nodes.length === 0 ? html`<p>No nodes yet. Start <code>orchard node</code> on each Mac.</p>` : ''}
      <ul class="cards">${nodes.map((n) => html`<${NodeCard} key=${n.id} node=${n} />`)}</ul>
      ${discovered.length > 0 ? html`
        <h3 id="discovered-h">Discovered, not joined <span class="muted">${discovered.length}</span></h3>
        <ul class="cards" aria-labelledby="discovered-h">${discovered.map((d) => html`<${DiscoveredCard} key=${d.address} agent=${d} />`)}</ul>` : ''}
      <p class="legend" aria-hidden="true">
        <span class="swatch used"></span> used by Orchard engines
        <span class="swatch budget"></span> budget (shaded up to it)
        <span class="swatch wired"></span> wired limit · bar = RAM
      </p>
    </section>`;
}
