"""What counts as "the VM's screen rendered" (tests/e2e and ../../shared/docs/real-peers.md)."""

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


def differing_fraction(a, b):
    a = Image.open(a).convert("RGB")
    b = Image.open(b).convert("RGB")
    assert a.size == b.size, (a.size, b.size)
    diff = sum(1 for p, q in zip(a.getdata(), b.getdata()) if p != q)
    return diff / (a.size[0] * a.size[1])
