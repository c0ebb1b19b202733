// Drives Debian's Chromium (headless) through one of Porthole's console pages.
//   node browser.mjs vnc URL OUT.png [WAIT_MS]   -> canvas pixels saved as PNG
//   node browser.mjs serial URL [WAIT_MS] [KEYS] -> terminal text
//   node browser.mjs spice URL OUT.png [WAIT_MS] -> spice-html5's primary surface saved as PNG;
//                                                   OUT.png.traffic: every WebSocket frame and HTTP
//                                                   response the page sent or received, concatenated
//   node browser.mjs status URL [WAIT_MS]        -> the page's status only
//   node browser.mjs vnc-keys URL OUT.png [UNLOCK] -> once the noVNC page is connected prints
//                                                   "CONNECTED {facts}" (the page's view-only badge,
//                                                   window.porthole.viewOnly, noVNC's viewOnly), then
//                                                   on a "go" line on stdin presses Escape on noVNC's
//                                                   canvas every 100 ms until a "stop" line; then saves
//                                                   the canvas like vnc mode. UNLOCK=1 first turns
//                                                   noVNC's own viewOnly switch off (a user can, from
//                                                   the browser's console), so the keys really leave
//                                                   the client; "keyMessages" counts the KeyEvent and
//                                                   QEMU extended key event messages the page sent.
//   node browser.mjs until-ended URL [MAX_MS] [SOCKETS]
//                                                -> prints "CONNECTED" once the page is connected
//                                                   (and, given SOCKETS, that many of its
//                                                   WebSockets are open: SPICE's channels),
//                                                   then waits (at most MAX_MS) for the session
//                                                   to end; the page's status then
// Every mode also returns "opened" (how many WebSockets the page opened) and "closes": each of
// them that has closed, in close order, as {index (0: the first opened), url, code, reason, clean}
// (the close event's code: what Porthole's close frame said, 1005 for a close frame without a
// code, 1006 for no close frame at all).
// vnc mode also writes OUT.png.traffic like spice mode, and returns the sockets and the
// first frames each way (hex, up to 64 bytes each) as "frames".
// Every mode also returns "page" (the text of the page's <main>) and "missing" (which client
// library the page could not load, or null).
// Prints one JSON line: {"state", "text", ...}. Exit 0 when the page answered.
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

const [mode, url, ...rest] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1024, height: 600 } });
  // Records every WebSocket's close event before the page's own scripts run
  // (an init script runs outside the page's Content-Security-Policy).
  await page.addInitScript(() => {
    const Native = window.WebSocket;
    const seen = { opened: 0, open: 0, closes: [] };
    Object.defineProperty(window, '__portholeSockets', { value: seen });
    // A plain function that returns the native socket: pages see a real
    // WebSocket (same prototype, same constants), only its close is noted.
    function Recorded(...args) {
      const ws = new Native(...args);
      const index = seen.opened++;
      ws.addEventListener('open', () => { seen.open += 1; });
      ws.addEventListener('close', (e) => seen.closes.push({ index, url: ws.url, code: e.code,
                                                             reason: e.reason, clean: e.wasClean }));
      return ws;
    }
    Recorded.prototype = Native.prototype;
    for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) Recorded[k] = Native[k];
    window.WebSocket = Recorded;
  });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    // "Failed to load resource" names its URL only in the location.
    const where = m.text().startsWith('Failed to load resource') ? ` (${m.location().url})` : '';
    errors.push(m.text() + where);
  });
  const consoleLog = [];
  const failed = [];
  page.on('response', (r) => { if (r.status() >= 400) failed.push(`${r.status()} ${new URL(r.url()).pathname}`); });
  const sockets = [];
  const traffic = [];
  const frames = [];
  let keyMessages = 0;
  if (mode === 'spice' || mode === 'vnc' || mode === 'vnc-keys') {
    if (mode === 'spice') {
      page.on('console', (m) => { if (consoleLog.length < 200) consoleLog.push(`${m.type()}: ${m.text()}`); });
    }
    page.on('websocket', (ws) => {
      const s = { url: ws.url(), sent: 0, received: 0, closed: false };
      sockets.push(s);
      const keep = (dir, payload) => {
        const b = Buffer.isBuffer(payload) ? payload : Buffer.from(payload);
        traffic.push(b);
        if (frames.length < 40) frames.push({ socket: sockets.length - 1, dir, len: b.length, hex: b.subarray(0, 64).toString('hex') });
      };
      ws.on('framesent', (f) => {
        s.sent += 1;
        keep('sent', f.payload);
        // RFB KeyEvent (4), QEMU extended key event (255, 0): one message a frame (noVNC flushes each).
        const b = Buffer.isBuffer(f.payload) ? f.payload : Buffer.from(f.payload);
        if (b[0] === 4 || (b[0] === 255 && b[1] === 0)) keyMessages += 1;
      });
      ws.on('framereceived', (f) => { s.received += 1; keep('received', f.payload); });
      ws.on('close', () => { s.closed = true; });
    });
    page.on('response', async (r) => {
      const head = Object.entries(r.headers()).map(([k, v]) => `${k}: ${v}`).join('\n');
      traffic.push(Buffer.from(`${r.status()} ${r.url()}\n${head}\n\n`));
      try {
        traffic.push(await r.body());
      } catch {
        // no body (101, redirects)
      }
    });
  }
  const response = await page.goto(url);
  result.http_status = response.status();
  result.csp = response.headers()['content-security-policy'] ?? null;
  const settle = async (ms) => {
    // Wait for a final state, then let the screen or terminal fill.
    await page.waitForFunction(() => window.porthole && window.porthole.state !== 'connecting'
      || document.getElementById('status')?.dataset.state !== 'connecting', null, { timeout: 30000 });
    await page.waitForTimeout(ms);
  };
  if (mode === 'vnc') {
    const [out, wait] = rest;
    await settle(Number(wait ?? 5000));
    // vnc_lite.html and Porthole's page draw in #screen, noVNC's vnc.html in #noVNC_container.
    const dataUrl = await page.evaluate(() => document.querySelector('#screen canvas, #noVNC_container canvas')
      ?.toDataURL('image/png') ?? null);
    if (dataUrl) writeFileSync(out, Buffer.from(dataUrl.split(',')[1], 'base64'));
    result.canvas = Boolean(dataUrl);
    result.sockets = sockets;
    result.frames = frames;
    await page.waitForTimeout(200);
    writeFileSync(`${out}.traffic`, Buffer.concat(traffic));
  } else if (mode === 'vnc-keys') {
    const [out, unlock] = rest;
    // Lines from the test on stdin, queued from the start so none is lost.
    const lines = createInterface({ input: process.stdin });
    const queue = [];
    let waiting = null;
    lines.on('line', (l) => { if (waiting) { const w = waiting; waiting = null; w(l); } else queue.push(l); });
    const nextLine = () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((r) => { waiting = r; }));
    await settle(0);
    const facts = await page.evaluate(() => ({
      state: document.getElementById('status')?.dataset.state ?? null,
      badge: document.getElementById('view-only')?.textContent ?? null,
      cadHidden: document.getElementById('cad')?.hidden ?? null,
      viewOnly: window.porthole?.viewOnly ?? null,
      rfbViewOnly: window.porthole?.rfb?.viewOnly ?? null,
    }));
    if (unlock === '1') await page.evaluate(() => { window.porthole.rfb.viewOnly = false; });
    await page.evaluate(() => window.porthole?.rfb?.focus());
    console.log(`CONNECTED ${JSON.stringify(facts)}`);
    if (facts.state === 'connected') {
      await nextLine();
      let stop = false;
      nextLine().then(() => { stop = true; });
      result.pressed = 0;
      while (!stop) {
        await page.keyboard.press('Escape');
        result.pressed += 1;
        await page.waitForTimeout(100);
      }
    }
    lines.close();
    // The last updates land (the test stops the keys once the VM's screen is final).
    await page.waitForTimeout(300);
    const dataUrl = await page.evaluate(() => document.querySelector('#screen canvas')?.toDataURL('image/png') ?? null);
    if (dataUrl) writeFileSync(out, Buffer.from(dataUrl.split(',')[1], 'base64'));
    result.canvas = Boolean(dataUrl);
    result.facts = facts;
    result.keyMessages = keyMessages;
  } else if (mode === 'spice') {
    const [out, wait] = rest;
    await settle(0);
    // The primary surface: spice-html5 adds it when the display channel's
    // SURFACE_CREATE arrives, then draws into it; wait until it has content.
    const drawn = await page.waitForFunction(() => {
      const c = document.getElementById('spice_surface_0');
      if (!c || !c.width || !c.height) return false;
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      for (let i = 4; i < d.length; i += 4) {
        if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return true;
      }
      return false;
    }, null, { timeout: 30000, polling: 200 }).then(() => true, () => false);
    await page.waitForTimeout(Number(wait ?? 2000));
    const dataUrl = await page.evaluate(() => document.querySelector('canvas#spice_surface_0')
      ?.toDataURL('image/png') ?? null);
    if (dataUrl) writeFileSync(out, Buffer.from(dataUrl.split(',')[1], 'base64'));
    result.canvas = Boolean(dataUrl);
    result.drawn = drawn;
    result.html = await page.content();
    result.sockets = sockets;
    result.console = consoleLog;
    // Let late responses land, then leave the traffic for the test to search.
    await page.waitForTimeout(200);
    writeFileSync(`${out}.traffic`, Buffer.concat(traffic));
  } else if (mode === 'serial') {
    const [wait, keys] = rest;
    await settle(1000);
    if (keys) await page.keyboard.type(keys);
    await page.waitForTimeout(Number(wait ?? 5000));
    result.terminal = await page.evaluate(() => window.porthole?.terminalText?.() ?? '');
    result.received = await page.evaluate(() => window.porthole?.received?.() ?? 0);
  } else if (mode === 'until-ended') {
    await settle(0);
    if (rest[1]) {
      await page.waitForFunction((n) => window.__portholeSockets.open >= n, Number(rest[1]),
        { timeout: 30000, polling: 100 }).catch(() => {});
    }
    const state = await page.evaluate(() => document.getElementById('status')?.dataset.state);
    if (state === 'connected') {
      console.log('CONNECTED');
      await page.waitForFunction(() => !['connected', 'connecting'].includes(
        document.getElementById('status')?.dataset.state), null, { timeout: Number(rest[0] ?? 60000), polling: 100 })
        .catch(() => {});
      // Every socket the page opened (SPICE channels) reports its close too:
      // waited for, not a fixed pause (a busy machine closes them later).
      await page.waitForFunction(() => window.__portholeSockets.closes.length >= window.__portholeSockets.opened,
        null, { timeout: 20000, polling: 100 }).catch(() => {});
    }
  } else {
    await settle(Number(rest[0] ?? 0));
  }
  result.state = await page.evaluate(() => document.getElementById('status')?.dataset.state ?? null);
  result.text = await page.evaluate(() => document.getElementById('status')?.textContent ?? null);
  result.page = await page.evaluate(() => document.querySelector('main')?.innerText ?? null);
  result.missing = await page.evaluate(() => window.porthole?.missing ?? null);
  result.errors = errors;
  result.failed = failed;
  Object.assign(result, await page.evaluate(() => window.__portholeSockets ?? { opened: 0, closes: [] }));
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
