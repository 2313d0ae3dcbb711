"""The vocabulary of the tiny offline tokenizers.

Every word in `WORDS` is a single token in the tiny CLIP tokenizer and a single piece in the tiny T5
tokenizer, so word lookups behave as with real tokenizers. Any word outside it splits into several
tokens; `MULTI_TOKEN_WORD` ("photorealistic") is guaranteed to.
"""

from __future__ import annotations

WORDS: tuple[str, ...] = tuple(
    """
    a an the of on in at and with to from by for near under over behind beside between is are
    photo picture painting drawing image portrait landscape render sketch illustration
    cat cats dog dogs bird horse cow fox owl fish lion tiger bear rabbit mouse frog duck
    man woman person child girl boy people robot knight wizard astronaut
    car bus truck bike boat ship train plane rocket
    house castle tower bridge city street road forest tree trees flower flowers garden park field mountain
    mountains hill river lake sea ocean beach desert island sky cloud clouds sun moon star stars rain snow
    table chair cup bottle book lamp window door wall floor bed box ball hat shirt
    red green blue yellow orange purple pink black white gray brown golden silver
    big small large tiny tall short old new bright dark happy sad cute beautiful blurry sharp detailed
    left right top bottom middle center background foreground corner
    circle square triangle shape shapes
    morning evening night sunset sunrise winter summer autumn spring
    one two three four five
    style oil watercolor digital art cinematic realistic
    """.split()
)
MULTI_TOKEN_WORD = "photorealistic"
