// noVNC console page: noVNC's RFB client on Porthole's /vnc WebSocket.
// The token already authenticated the user: Porthole offers the browser
// no VNC password prompt.
import {
  closeMessage, followWatchers, loadLibrary, refusedMessage, setStatus, showViewOnly, socketUrl, token, viewOnly, whyRefused,
} from './session.js';

const novnc = await loadLibrary('../vendor/novnc/core/rfb.js', 'novnc');
const RFB = novnc?.default;

const screen = document.getElementById('screen');
// Served as /playback: a recording, played at its recorded speed.
const playback = location.pathname.endsWith('/playback');
const cad = document.getElementById('cad');
cad.hidden = viewOnly;
showViewOnly();
let reconnects = 0;
let current = null;

// Fit to window: noVNC scales the screen to the room the page has for it,
// its shape kept. The choice is kept in this browser for the next console.
const fit = document.getElementById('fit');
// Storage may be blocked (a privacy setting): the choice is then this page's.
const stored = (() => {
  try {
    return window.localStorage;
  } catch {
    return null;
  }
})();
let fitting = stored?.getItem('porthole.fit') === '1';
function showFit() {
  fit.setAttribute('aria-pressed', String(fitting));
  if (current) current.scaleViewport = fitting;
}
fit.onclick = () => {
  fitting = !fitting;
  try {
    stored?.setItem('porthole.fit', fitting ? '1' : '0');
  } catch {
    // Full or blocked: kept for this page only.
  }
  showFit();
};
showFit();

// The clipboard, as text both ways (RFB cut text; noVNC's extended
// clipboard where the server has it). QEMU's VNC server needs an agent in
// the guest for it. A view-only page (a shadow, a playback) has none: it
// would show a watcher what the user copied, and Porthole drops its sends.
const clipboardToggle = document.getElementById('clipboard-toggle');
const clipboard = document.getElementById('clipboard');
const clipboardText = document.getElementById('clipboard-text');
const clipboardSend = document.getElementById('clipboard-send');
clipboardToggle.hidden = viewOnly || playback;
clipboardToggle.onclick = () => {
  clipboard.hidden = !clipboard.hidden;
  clipboardToggle.setAttribute('aria-expanded', String(!clipboard.hidden));
};
clipboardSend.onclick = () => current?.clipboardPasteFrom(clipboardText.value);
window.porthole = Object.assign(window.porthole ?? {}, {
  clipboardText: () => clipboardText.value,
  clipboardOffered: () => !clipboardToggle.hidden,
  fitting: () => fitting,
  // The screen as drawn, in CSS pixels.
  canvasSize: () => {
    const canvas = screen.querySelector('canvas');
    return canvas ? [canvas.clientWidth, canvas.clientHeight] : null;
  },
});

function connect() {
  let connected = false;
  setStatus('connecting', 'Connecting…');
  // Porthole's own socket, handed to noVNC, so its close code is known
  // (noVNC's disconnect event does not carry it).
  const socket = new WebSocket(socketUrl(playback ? 'playback/vnc' : 'vnc'));
  let closeCode = null;
  socket.addEventListener('close', (e) => { closeCode = e.code; });
  const rfb = new RFB(screen, socket, { shared: true });
  // noVNC's own switch only spares the user a cursor and keys that do
  // nothing: Porthole drops a view-only client's input whatever it sends.
  rfb.viewOnly = viewOnly;
  rfb.scaleViewport = fitting;
  rfb.resizeSession = false;
  current = rfb;
  window.porthole = Object.assign(window.porthole ?? {}, { rfb });
  rfb.addEventListener('clipboard', (e) => {
    if (!clipboardToggle.hidden) clipboardText.value = e.detail.text;
  });
  rfb.addEventListener('connect', () => {
    connected = true;
    reconnects = 0;
    cad.disabled = false;
    clipboardSend.disabled = false;
    setStatus('connected', playback ? 'Playing the recording' : 'Connected');
    if (!playback) followWatchers();
  });
  rfb.addEventListener('desktopname', (e) => {
    document.getElementById('title').textContent = e.detail.name;
    document.title = e.detail.name;
  });
  rfb.addEventListener('disconnect', async (e) => {
    cad.disabled = true;
    clipboardSend.disabled = true;
    if (playback) {
      // The last frame stays on the canvas.
      setStatus(closeCode === 1000 ? 'ended' : 'disconnected',
        closeCode === 1000 ? 'Recording played to its end' : closeMessage(closeCode));
      return;
    }
    const why = await whyRefused('vnc');
    if (why !== 'ok') {
      setStatus(why, refusedMessage(why));
      return;
    }
    // Porthole ended the session on purpose (taken over by another tab,
    // console closed, link expired, idle, restarting): say so rather than
    // reconnect (a tab taken over would take the console back).
    if (closeCode !== null && (closeCode >= 4000 || closeCode === 1001)) {
      setStatus('disconnected', closeMessage(closeCode));
      return;
    }
    // The token still opens the console: a dropped connection reconnects,
    // as noVNC's own page does, a few times. A socket that never opened with
    // a good token means the hypervisor did not answer.
    if (!connected && reconnects >= 1) {
      setStatus('unavailable', refusedMessage('unavailable'));
      return;
    }
    if (!e.detail.clean && reconnects < 3) {
      reconnects += 1;
      setStatus('connecting', 'Reconnecting…');
      setTimeout(connect, 1000 * reconnects);
      return;
    }
    setStatus('disconnected', closeMessage(closeCode));
  });
  cad.onclick = () => rfb.sendCtrlAltDel();
}

if (!RFB) {
  // loadLibrary has said what is missing.
} else if (!token) {
  setStatus('refused', refusedMessage('refused'));
} else {
  connect();
}
