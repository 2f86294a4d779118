// Events view: the coordinator's last cluster events, newest first.
import { html } from './html.js';
import { clockTime } from './format.js';

export function EventsView({ events }) {
  const newest = [...events].reverse();
  return html`
    <section aria-labelledby="events-h">
      <h2 id="events-h">Events</h2>
      ${newest.length === 0 ? html`<p>No events yet.</p>` : ''}
      <ol class="events" reversed>
        ${newest.map(
          (e) => html`<li key=${e.seq} class=${`event level-${e.level}`} data-kind=${e.kind}>
            <time datetime=${new Date(e.atMs).toISOString()}>${clockTime(e.atMs)}</time>
            <span class="level">${e.level}</span>
            <span>${e.message}</span></li>`,
        )}
      </ol>
    </section>`;
}
