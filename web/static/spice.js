// spice-html5 console page: Debian's spice-html5 on Porthole's /spice
// WebSocket. Every SPICE channel opens its own socket to the same URL, and
// Porthole terminates the SPICE link inside it: the page's SPICE password is
// a short-lived ticket from POST spice-ticket, never the hypervisor's.
import {
  closeMessage, followWatchers, loadLibrary, refusedMessage, setStatus, showViewOnly, socketUrl, token, viewOnly, whyRefused,
} from './session.js';

const spice = await loadLibrary('../vendor/spice-html5/main.js', 'spice-html5');

// Served as /playback: a recording, played at its recorded speed. Its
// sockets need no ticket: the playback's token admitted them.
const playback = location.pathname.endsWith('/playback');

const cad = document.getElementById('cad');
cad.hidden = viewOnly;
showViewOnly();
const screen = document.getElementById('screen');
let reconnects = 0;
let sc = null;

const CODES = ['expired', 'refused', 'revoked', 'busy', 'unavailable'];

// A fresh ticket for this token; throws the refusal code when there is none.
async function ticket() {
  const url = new URL('spice-ticket', location.href);
  url.search = new URLSearchParams({ token }).toString();
  let r;
  try {
    r = await fetch(url, { method: 'POST', cache: 'no-store' });
  } catch {
    throw 'unavailable';
  }
  const body = await r.json().catch(() => ({}));
  if (!r.ok || typeof body.ticket !== 'string') throw CODES.includes(body.error) ? body.error : 'unavailable';
  return body.ticket;
}

async function connect() {
  setStatus('connecting', reconnects ? 'Reconnecting…' : 'Connecting…');
  let password = '';
  try {
    if (!playback) password = await ticket();
  } catch (code) {
    setStatus(code, refusedMessage(code));
    return;
  }
  let connected = false;
  let failed = false;
  let closeCode = null;
  let conn;
  try {
    conn = new spice.SpiceMainConn({
      uri: socketUrl(playback ? 'playback/spice' : 'spice'),
      password,
      screen_id: 'screen',
      onsuccess: () => {
        connected = true;
        reconnects = 0;
        cad.disabled = false;
        setStatus('connected', playback ? 'Playing the recording' : 'Connected');
        if (!playback) followWatchers();
      },
      // Only the main channel reports here; its socket closing, a refused
      // ticket ("Permission denied.") and a link timeout all end the session.
      onerror: (e) => {
        if (failed) return;
        failed = true;
        ended(conn, connected, e, () => closeCode);
      },
    });
  } catch (e) {
    console.warn(`spice: ${e}`);
    setStatus('unavailable', refusedMessage('unavailable'));
    return;
  }
  password = undefined;
  // Porthole's close code (spice-html5 does not pass it on); it is recorded
  // before ended() reads it, which first awaits the preflight.
  conn.ws?.addEventListener('close', (e) => { closeCode = e.code; });
  sc = conn;
  window.porthole = Object.assign(window.porthole ?? {}, { spice: conn });
}

async function ended(conn, connected, error, closeCode) {
  cad.disabled = true;
  if (playback) {
    // The last frame stays on the screen.
    const code = closeCode();
    setStatus(code === 1000 ? 'ended' : 'disconnected',
      code === 1000 ? 'Recording played to its end' : closeMessage(code));
    return;
  }
  try {
    conn.stop();
  } catch {
    // already closed
  }
  screen.replaceChildren();
  screen.style.height = '';
  const why = await whyRefused('spice');
  if (why !== 'ok') {
    setStatus(why, refusedMessage(why));
    return;
  }
  const code = closeCode();
  // Porthole ended the session on purpose (console closed, link expired,
  // idle, restarting): say so rather than reconnect.
  if (code !== null && (code >= 4000 || code === 1001)) {
    setStatus('disconnected', closeMessage(code));
    return;
  }
  // A dropped session reconnects, with a fresh ticket, a few times; one that
  // never came up with a good token means the hypervisor did not let us in.
  if (connected && reconnects < 3) {
    reconnects += 1;
    setTimeout(connect, 1000 * reconnects);
    return;
  }
  if (!connected) {
    console.warn(`spice: ${error}`);
    setStatus('unavailable', refusedMessage('unavailable'));
    return;
  }
  setStatus('disconnected', closeMessage(code));
}

cad.onclick = () => spice.sendCtrlAltDel(sc);

if (!spice) {
  // loadLibrary has said what is missing.
} else if (!token) {
  setStatus('refused', refusedMessage('refused'));
} else {
  connect();
}
