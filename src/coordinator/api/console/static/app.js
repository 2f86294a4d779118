// The console shell: login, the key's scope, navigation, and the live feed every view reads.
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { html } from './html.js';
import { apiKey, getJson, HttpError, openFeed } from './api.js';
import { ClusterView } from './cluster.js';
import { ModelsView } from './models.js';
import { LoadView } from './load.js';
import { ChatView } from './chat.js';
import { EventsView } from './events.js';

const VIEWS = [
  { id: 'cluster', title: 'Cluster' },
  { id: 'models', title: 'Models' },
  { id: 'load', title: 'Load', admin: true },
  { id: 'chat', title: 'Chat' },
  { id: 'events', title: 'Events' },
];
const MAX_EVENTS = 200;

function Login({ message, onKey }) {
  const [key, setKey] = useState('');
  const submit = (e) => {
    e.preventDefault();
    onKey(key.trim());
  };
  return html`
    <main class="login" id="main">
      <h1>Orchard console</h1>
      <form onSubmit=${submit}>
        <label for="api-key">API key</label>
        <input id="api-key" name="api-key" type="password" autocomplete="current-password" required value=${key} onInput=${(e) => setKey(e.currentTarget.value)} />
        <button type="submit" class="primary">Sign in</button>
      </form>
      <p class="muted">The key is kept in this tab's session storage only.</p>
      ${message ? html`<p class="error" role="alert">${message}</p>` : ''}
    </main>`;
}

const viewFromHash = () => {
  const id = location.hash.replace(/^#/, '');
  return VIEWS.some((v) => v.id === id) ? id : 'cluster';
};

function Console({ scope, onSignOut }) {
  const admin = scope === 'admin';
  const [view, setView] = useState(viewFromHash());
  const [snapshot, setSnapshot] = useState(undefined);
  const [events, setEvents] = useState([]);
  const [link, setLink] = useState('connecting');
  const [notice, setNotice] = useState('');
  useEffect(() => {
    const onHash = () => setView(viewFromHash());
    addEventListener('hashchange', onHash);
    const stop = openFeed({
      onSnapshot: setSnapshot,
      onEvents: (list) => setEvents(list.slice(-MAX_EVENTS)),
      onEvent: (e) => setEvents((list) => [...list, e].slice(-MAX_EVENTS)),
      onStatus: setLink,
      onUnauthorized: onSignOut,
    });
    return () => {
      stop();
      removeEventListener('hashchange', onHash);
    };
  }, []);
  const visible = VIEWS.filter((v) => admin || !v.admin);
  const current = visible.some((v) => v.id === view) ? view : 'cluster';
  return html`
    <header class="top">
      <h1>Orchard</h1>
      <nav aria-label="views"><ul>${visible.map(
        (v) => html`<li><a href=${`#${v.id}`} aria-current=${v.id === current ? 'page' : undefined}>${v.title}</a></li>`,
      )}</ul></nav>
      <p class="link" role="status"><span class=${`dot ${link}`}></span>${link} · ${scope}</p>
      <button type="button" onClick=${onSignOut}>Sign out</button>
    </header>
    <main id="main" data-view=${current} data-ready=${snapshot ? 'true' : 'false'}>
      ${notice ? html`<p class="error" role="alert">${notice} <button type="button" onClick=${() => setNotice('')}>Dismiss</button></p>` : ''}
      ${current === 'cluster' ? html`<${ClusterView} snapshot=${snapshot} />` : ''}
      ${current === 'models' ? html`<${ModelsView} snapshot=${snapshot} admin=${admin} onError=${setNotice} />` : ''}
      ${current === 'load' ? html`<${LoadView} admin=${admin} />` : ''}
      ${current === 'chat' ? html`<${ChatView} snapshot=${snapshot} />` : ''}
      ${current === 'events' ? html`<${EventsView} events=${events} />` : ''}
    </main>`;
}

/** Ask the coordinator what the stored key may do; no key and a 401 means "show the login". */
function App() {
  const [session, setSession] = useState({ state: 'checking' });
  const check = async (afterLogin = false) => {
    const sent = apiKey.get();
    try {
      const s = await getJson('/v1/console/session');
      setSession({ state: 'in', scope: s.scope });
    } catch (err) {
      const denied = err instanceof HttpError && err.status === 401;
      // Forget only the key that was refused: one stored while this answer was on its way is untested.
      if (denied && sent && apiKey.get() === sent) apiKey.clear();
      setSession({ state: 'out', message: denied ? (afterLogin ? 'That key was refused.' : '') : err.message });
    }
  };
  useEffect(() => {
    check();
  }, []);
  const signOut = () => {
    apiKey.clear();
    setSession({ state: 'out', message: '' });
  };
  if (session.state === 'checking') return html`<main id="main"><p>Connecting…</p></main>`;
  if (session.state === 'out') {
    return html`<${Login} message=${session.message} onKey=${(k) => {
      apiKey.set(k);
      setSession({ state: 'checking-again' });
      check(true);
    }} />`;
  }
  if (session.state === 'checking-again') return html`<main id="main"><p>Signing in…</p></main>`;
  return html`<${Console} scope=${session.scope} onSignOut=${signOut} />`;
}

render(html`<${App} />`, document.getElementById('app'));
