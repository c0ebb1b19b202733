"""What counts as "the VM's screen rendered" (tests/e2e and ../../shared/docs/real-peers.md)."""

import subprocess
import time

from PIL import Image, ImageStat


def seabios_screen(path):
    """Asserts the image is SeaBIOS's text screen, not a blank one nor QEMU's
    640x480 'display not initialized' page."""
    img = Image.open(path).convert("RGB")
    assert img.size == (720, 400), f"{path}: {img.size}, not VGA text mode"
    grey = img.convert("L")
    top = grey.crop((0, 0, 720, 16))
    bright_top = sum(1 for v in top.getdata() if v > 128) / (720 * 16)
    assert bright_top >= 0.02, f"{path}: no banner text in the top rows ({bright_top:.3%})"
    assert len(img.getcolors(1 << 16) or []) >= 2, f"{path}: one colour"
    assert ImageStat.Stat(grey).stddev[0] >= 5, f"{path}: flat"
    background = img.getpixel((719, 399))
    fg = sum(1 for p in img.getdata() if p != background) / (720 * 400)
    assert fg >= 0.003, f"{path}: almost nothing drawn ({fg:.3%})"
    return img


def seabios_capture(capture):
    """Runs `capture()` (which returns an image's path) until it shows
    SeaBIOS's screen, twice at most: SeaBIOS clears its screen to retry the
    boot every few seconds, and a capture in that moment is blank. Returns
    the image; the second blank capture fails with its reason."""
    try:
        return seabios_screen(capture())
    except AssertionError:
        return seabios_screen(capture())


def differing_fraction(a, b):
    a = Image.open(a).convert("RGB")
    b = Image.open(b).convert("RGB")
    assert a.size == b.size, (a.size, b.size)
    diff = sum(1 for p, q in zip(a.getdata(), b.getdata()) if p != q)
    return diff / (a.size[0] * a.size[1])


def vnc_capture(vm, out):
    """gvnccapture of the VM's plain display, straight to QEMU: no proxy."""
    p = subprocess.run(["gvnccapture", f"127.0.0.1:{vm.display}", str(out)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    return out


def wait_for_final_vnc_screen(vm, tmp_path):
    """SeaBIOS's last line on COM1 (the VM must be fresh), then direct
    captures until two agree: the reference a console through Porthole must match."""
    vm.wait_for_serial(b"No bootable device")
    previous = None
    for n in range(20):
        shot = vnc_capture(vm, tmp_path / f"direct-{n}.png")
        seabios_screen(shot)
        if previous is not None and differing_fraction(previous, shot) < 0.01:
            return shot
        previous = shot
        time.sleep(0.3)
    raise AssertionError("the VM's screen never settled")
