// What every console page shares: the token, the socket URL, the status line,
// and finding out why a socket failed (browsers hide a refused upgrade's status,
// so the page asks the same endpoint without upgrading: a preflight).

export const token = new URLSearchParams(location.search).get('token')
  ?? new URLSearchParams((new URLSearchParams(location.search).get('path') ?? '').split('?')[1] ?? '').get('token');

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
