// Serial console page: xterm.js on Porthole's /serial WebSocket, raw bytes
// both ways (keys are sent as UTF-8, output is written as it arrives).
import { Terminal } from '../vendor/xterm/lib/xterm.mjs';
import { closeMessage, refusedMessage, setStatus, socketUrl, token, whyRefused } from './session.js';

const term = new Terminal({ convertEol: false, scrollback: 5000, cursorBlink: true });
term.open(document.getElementById('terminal'));
const encoder = new TextEncoder();
let received = 0;
window.porthole = Object.assign(window.porthole ?? {}, {
  terminalText: () => {
    const b = term.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
    return lines.join('\n');
  },
  received: () => received,
});

function connect() {
  setStatus('connecting', 'Connecting…');
  const ws = new WebSocket(socketUrl('serial'), ['binary']);
  ws.binaryType = 'arraybuffer';
  let opened = false;
  ws.onopen = () => {
    opened = true;
    setStatus('connected', 'Connected');
    term.focus();
  };
  ws.onmessage = (e) => {
    const bytes = new Uint8Array(e.data);
    received += bytes.length;
    term.write(bytes);
  };
  ws.onclose = async (e) => {
    if (!opened) {
      const why = await whyRefused('serial');
      setStatus(why === 'ok' ? 'unavailable' : why, refusedMessage(why === 'ok' ? 'unavailable' : why));
      return;
    }
    setStatus('disconnected', closeMessage(e.code));
  };
  term.onData((data) => ws.readyState === WebSocket.OPEN && ws.send(encoder.encode(data)));
  term.onBinary((data) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    ws.send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff));
  });
}

if (!token) {
  setStatus('refused', refusedMessage('refused'));
} else {
  connect();
}
