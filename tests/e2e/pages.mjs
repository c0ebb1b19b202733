// One headless Chromium with several console pages open at once, driven by
// one JSON command per line on stdin; one JSON answer per line on stdout.
// (browser.mjs opens one page per run; a shadow test needs an owner's page
// and a watcher's page side by side.)
//   {"op": "open", "name": N, "url": U}       -> the page's final state once it left "connecting"
//   {"op": "canvas", "name": N, "out": PATH}   -> noVNC's canvas (spice-html5's primary surface) saved as PNG
//   {"op": "press", "name": N, "key": K}       -> clicks the screen once (noVNC takes keys then), presses K
//   {"op": "wait_ended", "name": N, "ms": T}   -> waits (at most T ms) until the page is neither
//                                                  connected nor connecting and its sockets closed
//   {"op": "state", "name": N}                 -> the page's state now
//   {"op": "call", "name": N, "fn": F, "args": [...]} -> {value}: what window.porthole[F](...args)
//                                                  gives, awaited (the recording player's controls)
//   {"op": "click", "name": N, "selector": S, "x": X} -> clicks S (at X, 0..1, across its width,
//                                                  mid-height; its middle without X)
//   {"op": "keys", "name": N, "keys": [K...]} -> presses each key in turn where the focus is
//   {"op": "select", "name": N, "selector": S, "value": V} -> chooses V in the <select> S
//   {"op": "screenshot", "name": N, "out": PATH} -> the page as PNG
//   {"op": "close", "name": N}                 -> closes the page (its sockets close with it)
//   {"op": "quit"}
// A page's state: {state, text, badge (the #view-only text or null), opened, closes,
// errors, http_status}. Every WebSocket's close is recorded as browser.mjs does (its URL,
// which holds the token, is left out of the answer).
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ viewport: { width: 1024, height: 600 } });
await context.addInitScript(() => {
  const Native = window.WebSocket;
  const seen = { opened: 0, closes: [] };
  Object.defineProperty(window, '__portholeSockets', { value: seen });
  function Recorded(...args) {
    const ws = new Native(...args);
    const index = seen.opened++;
    ws.addEventListener('close', (e) => seen.closes.push({ index, url: ws.url, code: e.code,
                                                           reason: e.reason, clean: e.wasClean }));
    return ws;
  }
  Recorded.prototype = Native.prototype;
  for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) Recorded[k] = Native[k];
  window.WebSocket = Recorded;
});

const pages = new Map();

async function state(name) {
  const { page, errors, http_status: status, clicked } = pages.get(name);
  const got = await page.evaluate(() => ({
    state: document.getElementById('status')?.dataset.state ?? null,
    text: document.getElementById('status')?.textContent ?? null,
    badge: document.getElementById('view-only')?.textContent ?? null,
    // The "an operator is watching" badge, while it shows.
    watched: (w => (w && !w.hidden ? w.textContent : null))(document.getElementById('watched')),
    // The "this session is recorded" badge, while it shows.
    recorded: (r => (r && !r.hidden ? r.textContent : null))(document.getElementById('recorded')),
    opened: window.__portholeSockets?.opened ?? 0,
    // Without their URLs: those hold the token.
    closes: (window.__portholeSockets?.closes ?? []).map(({ url, ...close }) => close),
  }));
  return { ...got, errors, http_status: status, clicked };
}

async function handle(cmd) {
  switch (cmd.op) {
    case 'open': {
      const page = await context.newPage();
      const errors = [];
      page.on('pageerror', (e) => errors.push(String(e)));
      const entry = { page, errors, http_status: null, clicked: false };
      pages.set(cmd.name, entry);
      const response = await page.goto(cmd.url);
      entry.http_status = response.status();
      await page.waitForFunction(() => !['connecting', undefined].includes(
        document.getElementById('status')?.dataset.state), null, { timeout: 30000, polling: 50 });
      return state(cmd.name);
    }
    case 'canvas': {
      const { page } = pages.get(cmd.name);
      const dataUrl = await page.evaluate(() => document.querySelector('canvas#spice_surface_0, #screen canvas')?.toDataURL('image/png') ?? null);
      if (!dataUrl) return { canvas: false };
      writeFileSync(cmd.out, Buffer.from(dataUrl.split(',')[1], 'base64'));
      return { canvas: true };
    }
    case 'press': {
      const entry = pages.get(cmd.name);
      if (!entry.clicked) {
        await entry.page.click('#screen canvas');
        entry.clicked = true;
      }
      await entry.page.keyboard.press(cmd.key);
      return { pressed: cmd.key };
    }
    case 'wait_ended': {
      const { page } = pages.get(cmd.name);
      const ended = await page.waitForFunction(() => !['connected', 'connecting'].includes(
        document.getElementById('status')?.dataset.state)
        && window.__portholeSockets.closes.length >= window.__portholeSockets.opened,
      null, { timeout: cmd.ms ?? 20000, polling: 50 }).then(() => true, () => false);
      return { ended, ...(await state(cmd.name)) };
    }
    case 'state':
      return state(cmd.name);
    case 'call': {
      const { page } = pages.get(cmd.name);
      const value = await page.evaluate(([fn, args]) => window.porthole[fn](...args), [cmd.fn, cmd.args ?? []]);
      return { value: value ?? null };
    }
    case 'click': {
      const { page } = pages.get(cmd.name);
      const target = page.locator(cmd.selector).first();
      if (cmd.x === undefined) {
        await target.click();
      } else {
        const box = await target.boundingBox();
        await target.click({ position: { x: Math.min(box.width - 1, Math.max(0, box.width * cmd.x)), y: box.height / 2 } });
      }
      return { clicked: cmd.selector };
    }
    case 'keys': {
      const { page } = pages.get(cmd.name);
      for (const key of cmd.keys) await page.keyboard.press(key);
      return { pressed: cmd.keys.length };
    }
    case 'select': {
      const { page } = pages.get(cmd.name);
      await page.selectOption(cmd.selector, cmd.value);
      return { selected: cmd.value };
    }
    case 'screenshot': {
      const { page } = pages.get(cmd.name);
      await page.screenshot({ path: cmd.out });
      return { saved: cmd.out };
    }
    case 'close': {
      await pages.get(cmd.name).page.close();
      pages.delete(cmd.name);
      return { closed: cmd.name };
    }
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  if (cmd.op === 'quit') break;
  let answer;
  try {
    answer = { ok: true, ...(await handle(cmd)) };
  } catch (e) {
    answer = { ok: false, error: String(e) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
await browser.close();
