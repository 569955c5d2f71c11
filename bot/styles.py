"""Style presets for /imagine: a prompt template around the user's words plus a negative prompt, the
way the popular web UIs' "styles" work, so a one-word pick does what a paragraph of tags would."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Style:
    label: str
    #: The prompt with `{prompt}` where the user's words go.
    template: str
    negative: str

    def apply(self, prompt: str, negative: str) -> tuple[str, str]:
        """(prompt, negative prompt) with the style around the user's text; the user's negative
        words come first. `str.replace`, not `format`: a prompt may contain braces."""
        styled = self.template.replace("{prompt}", prompt)
        return styled, ", ".join(part for part in (negative, self.negative) if part)


STYLES: Mapping[str, Style] = MappingProxyType({
    "photographic": Style(
        "Photographic",
        "photograph of {prompt}, 35mm, natural light, sharp focus, highly detailed",
        "drawing, painting, illustration, cartoon, anime, render, blurry, deformed",
    ),
    "cinematic": Style(
        "Cinematic",
        "cinematic film still of {prompt}, shallow depth of field, anamorphic, film grain, moody",
        "cartoon, anime, painting, flat lighting, blurry, deformed",
    ),
    "anime": Style(
        "Anime",
        "anime artwork of {prompt}, key visual, vibrant colours, studio anime, clean lines",
        "photo, photorealistic, realistic, 3d render, blurry, deformed",
    ),
    "line-art": Style(
        "Line art",
        "line art drawing of {prompt}, clean ink lines, monochrome, white background",
        "colour, shading, photo, realistic, blurry, noisy",
    ),
    "low-poly": Style(
        "Low poly",
        "low poly 3d render of {prompt}, flat shaded polygons, geometric, minimal",
        "photo, realistic, noisy, detailed texture, blurry",
    ),
    "watercolor": Style(
        "Watercolour",
        "watercolour painting of {prompt}, soft washes, paper texture, loose brushwork",
        "photo, 3d render, harsh lines, blurry, deformed",
    ),
})
