"""The prompts a text-to-image model is calibrated on when the user gives none (``--prompts FILE`` replaces them).

Varied on purpose: subjects (people, animals, objects, places, text), styles (photo, painting, line art, 3D),
lighting, colour and composition, short and long, because a text encoder's activation ranges (and so the
cross-attention inputs' ranges) depend on what the prompt says and how long it is. The empty prompt is the
unconditional half of classifier-free guidance and is added by the pipeline, not listed here.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse on the moon",
    "a red fox sitting in fresh snow at dawn, telephoto lens",
    "an oil painting of a lighthouse in a storm, thick brush strokes",
    "a bowl of ramen with a soft boiled egg, top-down food photography",
    "a watercolor map of an imaginary island with mountains and rivers",
    "a close-up portrait of an elderly fisherman, dramatic side lighting",
    "a cyberpunk street market at night, neon signs reflected in puddles",
    "a minimalist line drawing of a cat curled up asleep",
    "a golden retriever puppy playing with a tennis ball on a lawn",
    "an isometric 3D render of a tiny cozy bedroom with plants",
    "a snow-covered mountain range under a starry sky, long exposure",
    "a vintage travel poster for Lisbon with trams and tiled facades",
    "a macro photo of a dragonfly's wing with water droplets",
    "a medieval castle on a cliff above the sea, fantasy concept art",
    "a glass of orange juice on a wooden table in morning sunlight",
    "the word HELLO written in colorful balloon letters",
    "a child drawing of a house, a sun and two trees, crayon on paper",
    "an underwater coral reef with a sea turtle and schools of fish",
    "a steaming cup of coffee next to an open book, shallow depth of field",
    "a futuristic electric sports car in a white studio",
    "a field of sunflowers under a thunderstorm sky",
    "a Japanese garden with a red bridge over a koi pond in autumn",
    "an owl perched on a branch at night, moonlight, detailed feathers",
    "a pixel art knight fighting a dragon, 16-bit video game style",
    "a busy train station in the rain, people with umbrellas, film grain",
    "a still life of lemons, a copper jug and a white cloth, Dutch golden age style",
    "a robot gardener watering tomatoes in a greenhouse",
    "a desert at sunset with long shadows of sand dunes",
    "a chalkboard with math equations and a drawing of a triangle",
    "a hot air balloon festival over green valleys, aerial view",
    "a bustling kitchen in a restaurant, chefs cooking with flames",
    "a black and white photograph of a jazz musician playing saxophone",
    "a stained glass window depicting a peacock",
    "a treehouse in a giant redwood forest with fog",
    "an anime girl with blue hair standing in a field of flowers, wind blowing",
    "a plate of colorful macarons arranged in a spiral",
    "a lone sailboat on a calm lake reflecting pink clouds",
    "a detailed pencil sketch of a human hand holding a pen",
    "a polar bear swimming under arctic ice, light rays through the water",
    "a neon sign that says OPEN in a rainy window",
    "a Victorian library with tall bookshelves and a rolling ladder",
    "a bowl of fruit painted in the style of Cezanne",
    "a mountain biker jumping over a rocky trail, motion blur",
    "a cozy cabin with smoke from the chimney in a snowy forest",
    "a paper origami crane on a white background",
    "a crowded beach in summer seen from above, colorful umbrellas",
    "a close-up of a bee collecting pollen on a lavender flower",
    "an ancient Greek temple ruin at golden hour",
    "a science fiction space station orbiting a ringed planet",
    "a baker holding a tray of fresh croissants, warm bakery light",
    "a yellow taxi on a New York street in the 1970s",
    "a chameleon on a branch changing colors, studio macro",
    "a mosaic of blue and white tiles with geometric patterns",
    "two people dancing tango in a dim ballroom",
    "a frozen waterfall with ice climbers, wide angle",
    "a bowl of salad with avocado, tomatoes and seeds, overhead shot",
    "a sketch of a fashion design, a flowing red dress with annotations",
    "a thunderstorm over a city skyline, lightning striking a tower",
    "an elephant family walking across the savanna at sunset",
    "a wooden chess board mid-game, dramatic lighting",
    "a surreal melting clock draped over a tree branch",
    "a handwritten letter with a fountain pen and a wax seal",
    "a rainbow over a waterfall in a tropical jungle",
    "an architect's blueprint of a modern house",
    "a knitted wool sweater texture, extreme close-up",
    "a tiger",
    "a city",
    "sunset",
    "a very detailed, highly realistic photograph of a small red bicycle leaning against a weathered blue door "
    "on a narrow cobblestone street in an old European town, with flower pots on the windowsills and soft light",
    "a flat vector illustration of a rocket launching, bold shapes and limited palette",
)


def load_prompts(file: str | Path | None) -> list[str]:
    """The calibration prompts: ``file`` (one prompt per line; blank lines and ``#`` comments skipped) or the
    shipped list. An empty or unreadable file is refused with one line."""
    if file is None:
        return list(CALIBRATION_PROMPTS)
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the prompts file {file}: {exc}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"the prompts file {file} holds no prompt (one per line; # starts a comment)")
    return prompts
