"""Draw the example images in this folder with Pillow alone.

    python examples/make_example_images.py

writes:

* ``shapes.png``  (768x768)  a red circle, a blue square and a green triangle on a light background
* ``house.png``   (1024x576) a non-square scene: sky, sun, a house with a door and windows, a tree, grass
* ``sign.jpg``    (640x480)  a shop sign with a few words of text, drawn with Pillow's default font

Everything is drawn from code, so the images carry the project's licence (MIT).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent


def draw_shapes() -> Image.Image:
    image = Image.new("RGB", (768, 768), (245, 243, 236))
    draw = ImageDraw.Draw(image)
    draw.ellipse((70, 90, 330, 350), fill=(220, 40, 40), outline=(120, 20, 20), width=4)  # red circle
    draw.rectangle((430, 100, 680, 350), fill=(40, 80, 210), outline=(20, 40, 110), width=4)  # blue square
    draw.polygon([(384, 430), (560, 690), (208, 690)], fill=(40, 160, 70), outline=(20, 90, 40), width=4)
    return image


def draw_house() -> Image.Image:
    width, height = 1024, 576
    image = Image.new("RGB", (width, height), (150, 200, 240))  # sky
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 420, width, height), fill=(90, 170, 70))  # grass
    draw.ellipse((840, 50, 950, 160), fill=(255, 210, 60))  # sun

    # house: walls, roof, door, two windows
    draw.rectangle((300, 250, 620, 440), fill=(235, 225, 200), outline=(90, 70, 50), width=3)
    draw.polygon([(270, 255), (460, 120), (650, 255)], fill=(170, 50, 40), outline=(90, 30, 20))
    draw.rectangle((430, 330, 490, 440), fill=(110, 70, 40))
    for left in (330, 530):
        draw.rectangle((left, 290, left + 60, 350), fill=(190, 225, 250), outline=(90, 70, 50), width=3)
        draw.line((left + 30, 290, left + 30, 350), fill=(90, 70, 50), width=2)
        draw.line((left, 320, left + 60, 320), fill=(90, 70, 50), width=2)

    # tree: trunk and crown
    draw.rectangle((775, 330, 805, 445), fill=(100, 65, 35))
    draw.ellipse((715, 220, 865, 360), fill=(40, 120, 50))
    return image


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: small bitmap font


def draw_sign() -> Image.Image:
    image = Image.new("RGB", (640, 480), (60, 62, 70))  # dark wall
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((60, 80, 580, 400), radius=24, fill=(250, 250, 245), outline=(200, 40, 40), width=10)
    lines = [("OPEN", 96, (200, 40, 40)), ("Coffee and Tea", 44, (30, 30, 30)), ("8 am - 6 pm", 40, (30, 30, 30))]
    y = 130
    for text, size, colour in lines:
        font = _font(size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text(((640 - (right - left)) // 2 - left, y - top), text, font=font, fill=colour)
        y += (bottom - top) + 40
    return image


def main() -> None:
    outputs = {
        "shapes.png": draw_shapes(),
        "house.png": draw_house(),
        "sign.jpg": draw_sign(),
    }
    for name, image in outputs.items():
        path = HERE / name
        if path.suffix == ".jpg":
            image.save(path, quality=90)
        else:
            image.save(path, optimize=True)
        print(f"wrote {path.relative_to(HERE.parent)} ({image.width}x{image.height}, {path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
