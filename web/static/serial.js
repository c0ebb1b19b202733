// Serial console page: xterm.js on Porthole's /serial WebSocket, raw bytes
// both ways (keys are sent as UTF-8, output is written as it arrives).
// The server serves npm's xterm.js (5+) or, where `npm ci` never ran,
// Debian's 3.8 at the same URL; the two differ in how they take bytes, give
// keys and expose their buffer, so the page adapts to whichever it got.
import {
  closeMessage, followWatchers, loadLibrary, refusedMessage, setStatus, showViewOnly, socketUrl, token, viewOnly, whyRefused,
} from './session.js';

const xterm = await loadLibrary('../vendor/xterm/lib/xterm.mjs', 'xterm');
// Served as /playback: a recording, played at its recorded speed.
const playback = location.pathname.endsWith('/playback');
const encoder = new TextEncoder();
let received = 0;

// The same small surface over either xterm.js.
function terminal(Terminal) {
  const term = new Terminal({ convertEol: false, scrollback: 5000, cursorBlink: !viewOnly, disableStdin: viewOnly });
  term.open(document.getElementById('terminal'));
  if (typeof term.onData === 'function') {
    return {
      term,
      write: (bytes) => term.write(bytes),
      onKeys: (send) => {
        term.onData((data) => send(encoder.encode(data)));
        term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
      },
      text: () => {
        const b = term.buffer.active;
        const lines = [];
        for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
        return lines.join('\n');
      },
    };
  }
  // xterm.js 3.x: strings only (a streaming decoder keeps characters split
  // across messages whole), keys as 'data' events, no public buffer API.
  let decoder = new TextDecoder();
  return {
    term,
    reset: () => { decoder = new TextDecoder(); },
    write: (bytes) => term.write(decoder.decode(bytes, { stream: true })),
    onKeys: (send) => term.on('data', (data) => send(encoder.encode(data))),
    text: () => {
      const had = term.hasSelection();
      term.selectAll();
      const all = term.getSelection();
      if (!had) term.clearSelection();
      return all.split('\n').map((l) => l.trimEnd()).join('\n');
    },
  };
}

function connect(t) {
  setStatus('connecting', 'Connecting…');
  t.reset?.();
  const ws = new WebSocket(socketUrl(playback ? 'playback/serial' : 'serial'), ['binary']);
  ws.binaryType = 'arraybuffer';
  let opened = false;
  ws.onopen = () => {
    opened = true;
    setStatus('connected', playback ? 'Playing the recording' : 'Connected');
    if (!playback) followWatchers();
    t.term.focus();
  };
  ws.onmessage = (e) => {
    const bytes = new Uint8Array(e.data);
    received += bytes.length;
    t.write(bytes);
  };
  ws.onclose = async (e) => {
    if (playback && opened && e.code === 1000) {
      setStatus('ended', 'Recording played to its end');
      return;
    }
    if (!opened) {
      const why = await whyRefused(playback ? 'playback/serial' : 'serial');
      setStatus(why === 'ok' ? 'unavailable' : why, refusedMessage(why === 'ok' ? 'unavailable' : why));
      return;
    }
    setStatus('disconnected', closeMessage(e.code));
  };
  // A view-only console sends nothing (Porthole would drop it anyway).
  if (!viewOnly) t.onKeys((bytes) => ws.readyState === WebSocket.OPEN && ws.send(bytes));
}

showViewOnly();
if (xterm) {
  const t = terminal(xterm.Terminal);
  window.porthole = Object.assign(window.porthole ?? {}, { terminalText: t.text, received: () => received });
  if (!token) {
    setStatus('refused', refusedMessage('refused'));
  } else {
    connect(t);
  }
}
