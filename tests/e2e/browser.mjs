// Drives Debian's Chromium (headless) through one of Porthole's console pages.
//   node browser.mjs vnc URL OUT.png [WAIT_MS]   -> canvas pixels saved as PNG
//   node browser.mjs serial URL [WAIT_MS] [KEYS] -> terminal text
//   node browser.mjs status URL [WAIT_MS]        -> the page's status only
// Prints one JSON line: {"state", "text", ...}. Exit 0 when the page answered.
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';

const [mode, url, ...rest] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1024, height: 600 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
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
    const dataUrl = await page.evaluate(() => document.querySelector('#screen canvas')?.toDataURL('image/png') ?? null);
    if (dataUrl) writeFileSync(out, Buffer.from(dataUrl.split(',')[1], 'base64'));
    result.canvas = Boolean(dataUrl);
  } else if (mode === 'serial') {
    const [wait, keys] = rest;
    await settle(1000);
    if (keys) await page.keyboard.type(keys);
    await page.waitForTimeout(Number(wait ?? 5000));
    result.terminal = await page.evaluate(() => window.porthole?.terminalText?.() ?? '');
    result.received = await page.evaluate(() => window.porthole?.received?.() ?? 0);
  } else {
    await settle(Number(rest[0] ?? 0));
  }
  result.state = await page.evaluate(() => document.getElementById('status')?.dataset.state ?? null);
  result.text = await page.evaluate(() => document.getElementById('status')?.textContent ?? null);
  result.errors = errors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
