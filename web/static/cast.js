// Recording player page: a serial console's recording (asciicast v2), read
// once from /playback/file and played by asciinema-player, with its controls
// (play/pause, the seek bar, its keys: space, arrows) and a speed chooser.
// Served at /playback for an asciicast; `&client=terminal` plays the same
// recording in the serial page instead (at its recorded speed, no pause).
import { loadScript, refusedMessage, setStatus, showViewOnly, token } from './session.js';

const SPEEDS = ['0.5', '1', '2', '4', '8'];

// The page's own links: the file (a download: asciinema, other tools) and
// the terminal playback.
function link(endpoint, extra = {}) {
  const url = new URL(endpoint, location.href);
  url.search = new URLSearchParams({ token, ...extra }).toString();
  return url.toString();
}
const fileUrl = link('playback/file');
document.getElementById('download').href = fileUrl;
document.getElementById('terminal-link').href = link('playback', { client: 'terminal' });

// The recording's text, or null after saying on the page why it is not there.
async function fetchRecording() {
  try {
    const r = await fetch(fileUrl, { cache: 'no-store' });
    if (r.ok) return await r.text();
    const body = await r.json().catch(() => ({}));
    const why = ['expired', 'refused', 'revoked'].includes(body.error) ? body.error : 'unavailable';
    setStatus(why, refusedMessage(why));
  } catch {
    setStatus('unavailable', refusedMessage('unavailable'));
  }
  return null;
}

function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds ?? 0));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

// One player at a time: asciinema-player takes its speed when created, so a
// new speed is a new player at the same point.
function playerOf(AsciinemaPlayer, text) {
  const box = document.getElementById('player');
  let player = null;
  let speed = 1;
  const create = (startAt, autoPlay) => {
    player?.dispose();
    box.replaceChildren();
    player = AsciinemaPlayer.create({ data: text }, box, {
      autoPlay, startAt, speed, preload: true, fit: 'both', controls: true,
    });
    const paused = async () => setStatus('paused', `Paused at ${clock(await player.getCurrentTime())}`);
    player.addEventListener('playing', () => setStatus('playing', speed === 1 ? 'Playing' : `Playing at ${speed}×`));
    player.addEventListener('pause', paused);
    player.addEventListener('seeked', async () => {
      if (window.porthole.state === 'paused') await paused();
    });
    player.addEventListener('ended', () => setStatus('ended', 'Played to its end'));
    // A paused player starts at its beginning whatever `startAt` says.
    if (!autoPlay) player.seek(startAt).then(paused);
    player.addEventListener('error', () => setStatus('unavailable', 'This recording could not be played.'));
  };
  const select = document.getElementById('speed');
  select.disabled = false;
  select.addEventListener('change', async () => {
    if (!SPEEDS.includes(select.value)) return;
    const at = await player.getCurrentTime();
    const playing = window.porthole.state === 'playing';
    speed = Number(select.value);
    create(at, playing);
  });
  create(0, true);
  return {
    currentTime: () => player.getCurrentTime(),
    duration: () => player.getDuration(),
    play: () => player.play(),
    pause: () => player.pause(),
    seek: (where) => player.seek(where),
    speed: () => speed,
  };
}

showViewOnly();
// A player that fails before it plays does so in promises of its own (a
// recording it cannot parse, a WebAssembly terminal the browser refuses):
// the page says so instead of loading forever.
window.addEventListener('unhandledrejection', () => {
  if (document.getElementById('status').dataset.state === 'connecting') {
    setStatus('unavailable', 'This recording could not be played.');
  }
});
if (!token) {
  setStatus('refused', refusedMessage('refused'));
} else {
  const [AsciinemaPlayer, text] = await Promise.all([
    loadScript('vendor/asciinema-player/asciinema-player.min.js', 'asciinema-player', 'AsciinemaPlayer'),
    fetchRecording(),
  ]);
  if (!AsciinemaPlayer) {
    const p = document.createElement('p');
    p.append('Meanwhile, the ', Object.assign(document.createElement('a'), {
      href: document.getElementById('terminal-link').href, textContent: 'serial console page',
    }), ' plays this recording (without pause or seek).');
    document.getElementById('missing')?.append(p);
  } else if (text !== null) {
    const controls = playerOf(AsciinemaPlayer, text);
    // For tests and the browser's console: the terminal's text as shown.
    const terminalText = () => [...document.querySelectorAll('#player pre.ap-term-text .ap-line')]
      .map((l) => l.textContent.trimEnd()).join('\n');
    window.porthole = Object.assign(window.porthole ?? {}, { terminalText, ...controls });
  }
}
