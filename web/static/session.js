// What every console page shares: the token, the socket URL, the status line,
// and finding out why a socket failed (browsers hide a refused upgrade's status,
// so the page asks the same endpoint without upgrading: a preflight).

export const token = new URLSearchParams(location.search).get('token')
  ?? new URLSearchParams((new URLSearchParams(location.search).get('path') ?? '').split('?')[1] ?? '').get('token');

// Whether the token names a view-only console (a JWT's `console.view_only`).
// Porthole enforces it on every byte; the page only says so and keeps its
// client from offering input.
export const viewOnly = (() => {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload))?.console?.view_only === true;
  } catch {
    return false;
  }
})();

// Says on the page that this console is view-only.
export function showViewOnly() {
  window.porthole = Object.assign(window.porthole ?? {}, { viewOnly });
  if (!viewOnly) return;
  const playing = location.pathname.endsWith('/playback');
  const badge = Object.assign(document.createElement('span'), {
    id: 'view-only',
    textContent: playing ? 'Playback of a recording'
      : 'View only: your keyboard and mouse do not reach this console',
  });
  document.querySelector('header').append(badge);
}

// How often a connected page asks whether an operator watches its session.
const WATCH_POLL_MS = 10000;
let following = false;

// Shows a badge while an operator watches this session (a shadow), where
// the operator lets pages say so (`[sessions] tell_watched`, the default).
// The token names the session for as long as it runs, expired or not.
// A view-only console may be recorded too; a shadow's own session never
// is, nor watched, so its page shows neither.
export function followWatchers() {
  if (following || !token) return;
  following = true;
  const badge = Object.assign(document.createElement('span'), {
    id: 'watched',
    hidden: true,
    textContent: 'An operator is watching this console',
  });
  // Its user is told before anything they type is kept.
  const recorded = Object.assign(document.createElement('span'), {
    id: 'recorded',
    hidden: true,
    textContent: 'This session is recorded',
  });
  document.querySelector('header').append(badge, recorded);
  const url = new URL('watched', location.href);
  url.search = new URLSearchParams({ token }).toString();
  const ask = async () => {
    try {
      const r = await fetch(url, { cache: 'no-store' });
      const body = r.ok ? await r.json() : {};
      if (r.ok && body.told === false) return;
      if (r.ok) {
        badge.hidden = !body.watched;
        // A node older than the notice does not say: keep what was shown.
        if (typeof body.recorded === 'boolean') recorded.hidden = !body.recorded;
        window.porthole = Object.assign(window.porthole ?? {}, { watched: body.watched === true });
      }
    } catch {
      // Asked again next time.
    }
    setTimeout(ask, WATCH_POLL_MS);
  };
  ask();
}

export function socketUrl(endpoint) {
  const url = new URL(endpoint, location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = new URLSearchParams({ token }).toString();
  return url.toString();
}

const MESSAGES = {
  expired: 'Console link expired: open the console again from your dashboard.',
  refused: 'Console link not valid: open the console again from your dashboard.',
  busy: 'Console busy: someone else is using this console.',
  unavailable: 'Console unavailable: try again in a moment.',
  revoked: 'Session ended by an operator: this console link no longer works.',
  ended: 'The session you were watching has ended.',
};

// WebSocket close codes Porthole sends (4000-4999 are its own).
const CLOSES = {
  1001: 'Gateway restarting: reconnect in a moment.',
  1003: 'Disconnected: protocol error.',
  1009: 'Disconnected: message too large or connection too slow.',
  1011: 'Disconnected: the console connection failed.',
  4000: 'Disconnected: the console was closed.',
  4001: 'Disconnected: the console link expired.',
  4002: 'Disconnected after a long idle period.',
  4003: 'Session ended by an operator.',
  4004: 'Disconnected: the longest session allowed has passed.',
  4005: 'Disconnected: the connection stopped answering.',
  4006: 'This console was opened in another window or tab: it continues there.',
};

export function setStatus(state, text) {
  const el = document.getElementById('status');
  el.dataset.state = state;
  el.textContent = text;
  window.porthole = Object.assign(window.porthole ?? {}, { state, text });
}

export function closeMessage(code) {
  return CLOSES[code] ?? 'Disconnected.';
}

// Asks why `endpoint` would not open; returns one of MESSAGES' keys, or 'ok'.
export async function whyRefused(endpoint) {
  try {
    const url = new URL(endpoint, location.href);
    url.search = new URLSearchParams({ token }).toString();
    const r = await fetch(url, { cache: 'no-store' });
    if (r.ok) return 'ok';
    const body = await r.json().catch(() => ({}));
    return body.error in MESSAGES ? body.error : 'unavailable';
  } catch {
    return 'unavailable';
  }
}

export function refusedMessage(code) {
  return MESSAGES[code] ?? MESSAGES.unavailable;
}

// The client libraries the pages load from the server, and what installs
// each on the server (the page's user can pass it on to whoever runs it).
const LIBRARIES = {
  novnc: { name: 'noVNC', page: 'VNC console', fixes: ['sudo apt-get install novnc'] },
  'spice-html5': { name: 'spice-html5', page: 'SPICE console', fixes: ['sudo apt-get install spice-html5'] },
  xterm: {
    name: 'xterm.js',
    page: 'serial console',
    fixes: ['cd web && npm ci', 'sudo apt-get install node-xterm'],
  },
  'asciinema-player': { name: 'asciinema-player', page: 'recording player', fixes: ['cd web && npm ci'] },
};

// Imports a client library (`url` is relative to this file); when it cannot
// be loaded, says on the page which one is missing and the command that
// installs it, and returns null. A static import would fail the whole page
// silently, leaving "Connecting…" forever.
export async function loadLibrary(url, key) {
  try {
    return await import(url);
  } catch (e) {
    console.error(`${key}: ${e}`);
    showMissing(key);
    return null;
  }
}

// Runs a client library that is a classic script defining the global
// `name` (`url` is relative to the page); the global, or null after saying
// on the page what is missing, like loadLibrary.
export async function loadScript(url, key, name) {
  try {
    await new Promise((resolve, reject) => {
      const script = Object.assign(document.createElement('script'), { src: url });
      script.onload = resolve;
      script.onerror = () => reject(new Error(`${url} did not load`));
      document.head.append(script);
    });
    if (window[name] === undefined) throw new Error(`${url} defined no ${name}`);
    return window[name];
  } catch (e) {
    console.error(`${key}: ${e}`);
    showMissing(key);
    return null;
  }
}

function showMissing(key) {
  const lib = LIBRARIES[key];
  setStatus('missing', `Console client missing: ${lib.name} is not installed on this server.`);
  window.porthole.missing = key;
  const box = document.createElement('section');
  box.className = 'missing';
  box.id = 'missing';
  const add = (tag, text) => box.appendChild(Object.assign(document.createElement(tag), { textContent: text }));
  add('h2', `${lib.name} is missing`);
  add('p', `This ${lib.page} needs ${lib.name}, which the Porthole server could not serve. `
    + (lib.fixes.length > 1 ? 'Any one of these commands, run on the server, installs it:'
      : 'This command, run on the server, installs it:'));
  for (const fix of lib.fixes) add('pre', fix);
  add('p', 'Then restart Porthole and reload this page.');
  document.querySelector('main').replaceChildren(box);
}
