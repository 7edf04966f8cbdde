"""The web UI (Gradio): single-ID and multi-ID generation, and the identity bank.

Its handlers go through the same :class:`~uniportrait.server.service.PortraitService` and the
same bounded :class:`~uniportrait.server.jobs.WorkQueue` as the REST API, so the limits, the
messages and the server's capacity are shared. Problems are shown as Gradio error pop-ups with
the service's one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uniportrait.server.config import MB, ServerConfig
from uniportrait.server.jobs import JobTimeout, QueueFull, WorkQueue
from uniportrait.server.service import (
    GenerateRequest,
    IdentityRequest,
    PortraitService,
    ServiceError,
    Upload,
)
from uniportrait.settings import (
    FACEID_SCALE,
    GUIDANCE_SCALE,
    IDENTITY_GUIDANCE,
    STRUCTURE_SCALE,
    default_structure_scale,
)

MULTI_ID_SLOTS = 4  # people shown in the multi-ID tab (capped by the server's limit)


def read_uploads(paths, service: PortraitService, label: str) -> list[Upload]:
    """Gradio hands over temporary file paths; refuse oversized files before reading them."""
    uploads = []
    for path in paths or []:
        path = Path(path if isinstance(path, (str, os.PathLike)) else path.name)
        size, limit = path.stat().st_size, service.limits.max_upload_bytes
        if size > limit:
            raise ServiceError(
                413,
                "upload_too_large",
                f"{label}: photo {path.name!r} is {size / MB:.1f} MB; the limit is {limit / MB:g} MB per photo",
            )
        uploads.append(Upload(path.read_bytes(), path.name))
    return uploads


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the server's errors into Gradio pop-ups with their message."""
    import functools

    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except ServiceError as err:
            raise gr.Error(err.message, title="Cannot do that", print_exception=False) from None
        except QueueFull as err:
            raise gr.Error(
                f"The server is busy; try again in about {err.retry_after} s.", title="Busy"
            ) from None
        except JobTimeout as err:
            raise gr.Error(str(err), title="Too slow") from None

    return wrapper


def _slider(setting, value: float, step: float, label: str, elem_id: str):
    """A slider over a setting's range (:mod:`uniportrait.settings`)."""
    import gradio as gr

    return gr.Slider(setting.low, setting.high, value=value, step=step, label=label, elem_id=elem_id)


class PortraitUI:
    """Builds the Blocks; one instance per app."""

    def __init__(self, service: PortraitService, queue: WorkQueue, config: ServerConfig) -> None:
        self.service = service
        self.queue = queue
        self.config = config
        self.stored_dropdowns: list = []

    # -- handlers ------------------------------------------------------------------------------

    def generate(
        self, prompt, faceid_scale, structure_scale, guidance, identity_guidance, seed, steps, side_w, side_h,
        num, *slots,
    ):  # fmt: skip
        """``slots``: for each person, (photos, stored name, mix photos, mix scale).
        ``identity_guidance``: None (an empty box) guides the people with the text's scale."""
        identities = []
        for k in range(0, len(slots), 4):
            photos, stored, mix, mix_scale = slots[k : k + 4]
            label = f"identity {k // 4 + 1}"
            if not photos and not stored:
                if mix:
                    raise ServiceError(
                        422,
                        "invalid_request",
                        f"{label}: photos to mix in, but no photos or stored identity to mix them into",
                    )
                continue
            identities.append(
                IdentityRequest(
                    photos=read_uploads(photos, self.service, label),
                    name=None if photos else stored,
                    mix=read_uploads(mix, self.service, f"{label} (mix)"),
                    mix_scale=float(mix_scale or 0.0),
                    label=label,
                )
            )
        request = GenerateRequest(
            prompt=prompt or "",
            identities=identities,
            seed=None if seed is None or int(seed) < 0 else int(seed),
            steps=int(steps),
            faceid_scale=float(faceid_scale),
            structure_scale=float(structure_scale),
            guidance_scale=float(guidance),
            identity_guidance=None if identity_guidance is None else float(identity_guidance),
            width=int(side_w),
            height=int(side_h),
            num_images=int(num),
            routing=True,
        )
        self.service.check_generate(request)
        result = self.queue.run_sync(lambda d: self.service.generate(request, d), self.config.timeout_s)
        gallery = []
        for k, (image, overlay) in enumerate(zip(result.images, result.overlays), start=1):
            gallery.append((image, f"image {k}"))
            if overlay is not None:
                gallery.append((overlay, f"routing {k}"))
        faces = [(face, ident.label) for ident, crops in zip(identities, result.faces) for face in crops]
        note = f"seed {result.seed} · {result.seconds:.1f} s"
        if len(identities) >= 2:
            note += " · routing overlay: each identity's colour marks where it went"
        return gallery, faces, note

    def add_identity(self, name, photos, mix, mix_scale, overwrite):
        name = (name or "").strip()
        self.service.check_name(name)
        label = f"identity {name!r}"
        ident = IdentityRequest(
            photos=read_uploads(photos, self.service, label),
            mix=read_uploads(mix, self.service, f"{label} (mix)"),
            mix_scale=float(mix_scale or 0.0),
        )
        self.service.check_new_identity(name, ident, bool(overwrite))
        info = self.queue.run_sync(
            lambda d: self.service.add_identity(name, ident, bool(overwrite), d), self.config.timeout_s
        )
        return (f"Stored **{info['name']}** ({info['references']} photo(s)).", *self.refresh())

    def remove_identity(self, name):
        if not name:
            raise ServiceError(422, "invalid_request", "choose a stored identity to delete")
        self.service.remove_identity(name)
        return (f"Deleted **{name}**.", *self.refresh())

    def refresh(self):
        """The bank table, then every 'stored identity' dropdown with fresh choices."""
        import gradio as gr

        infos = self.service.list_identities()
        names = [i["name"] for i in infos if i["usable"]]
        rows = ["| name | photos | mixes | created | usable here |", "|---|---|---|---|---|"]
        rows += [
            f"| {i['name']} | {i['references']} | {i['mixes']} | {i['created']} | {'yes' if i['usable'] else 'no'} |"
            for i in infos
        ]
        table = "\n".join(rows) if infos else "_No stored identities yet._"
        dropdowns = [gr.Dropdown(choices=names, value=None) for _ in self.stored_dropdowns]
        return (table, gr.Dropdown(choices=[i["name"] for i in infos], value=None), *dropdowns)

    # -- layout --------------------------------------------------------------------------------

    def _person(self, tab: str, k: int):
        import gradio as gr

        with gr.Group():
            photos = gr.File(
                label=f"Identity {k}: photos (one or more of the same person)",
                file_count="multiple",
                file_types=["image"],
                elem_id=f"{tab}-photos-{k}",
            )
            stored = gr.Dropdown(label=f"…or identity {k} from the identity bank", choices=[], value=None)
            self.stored_dropdowns.append(stored)
            with gr.Accordion(f"Mix another face into identity {k}", open=False):
                mix = gr.File(label="Faces to mix in", file_count="multiple", file_types=["image"])
                mix_scale = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Mix scale")
        return [photos, stored, mix, mix_scale]

    def _generate_tab(self, tab: str, people: int, structure_default: float) -> None:
        import gradio as gr

        lim = self.config.limits
        side = min(self.config.default_side, lim.max_side)
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    label="Prompt", placeholder="a photo of a person at the beach", elem_id=f"{tab}-prompt"
                )
                button = gr.Button("Generate", variant="primary", elem_id=f"{tab}-generate")
                slots = [c for k in range(1, min(people, 2) + 1) for c in self._person(tab, k)]
                if people > 2:
                    with gr.Accordion("More identities", open=False):
                        slots += [c for k in range(3, people + 1) for c in self._person(tab, k)]
                with gr.Accordion("Settings", open=True):
                    faceid = _slider(
                        FACEID_SCALE, FACEID_SCALE.default, 0.05, "Face-ID scale", f"{tab}-faceid"
                    )
                    structure = _slider(
                        STRUCTURE_SCALE, structure_default, 0.05, "Face-structure scale", f"{tab}-structure"
                    )
                    guidance = _slider(
                        GUIDANCE_SCALE, GUIDANCE_SCALE.default, 0.5, "Guidance scale", f"{tab}-guidance"
                    )
                    identity_guidance = gr.Number(
                        value=None,
                        minimum=IDENTITY_GUIDANCE.low,
                        maximum=IDENTITY_GUIDANCE.high,
                        label="Identity guidance scale (empty: the guidance scale; another value costs "
                        "a third pass per step)",
                        elem_id=f"{tab}-identity-guidance",
                    )
                    seed = gr.Number(value=0, precision=0, label="Seed (-1: random)", elem_id=f"{tab}-seed")
                    steps = gr.Slider(
                        1,
                        lim.max_steps,
                        value=min(self.config.default_steps, lim.max_steps),
                        step=1,
                        label="Steps",
                        elem_id=f"{tab}-steps",
                    )
                    with gr.Row():
                        width = gr.Slider(
                            64, lim.max_side, value=side, step=64, label="Width", elem_id=f"{tab}-width"
                        )
                        height = gr.Slider(
                            64, lim.max_side, value=side, step=64, label="Height", elem_id=f"{tab}-height"
                        )
                    num = gr.Slider(
                        1, lim.max_images, value=1, step=1, label="Number of images", elem_id=f"{tab}-num"
                    )
            with gr.Column():
                results = gr.Gallery(
                    label="Results" + (" (each followed by its routing overlay)" if people > 1 else ""),
                    columns=2,
                    format="png",
                    elem_id=f"{tab}-results",
                )
                faces = gr.Gallery(
                    label="Aligned faces used", columns=4, format="png", elem_id=f"{tab}-faces"
                )
                note = gr.Markdown(elem_id=f"{tab}-note")
        button.click(
            guarded(self.generate),
            inputs=[prompt, faceid, structure, guidance, identity_guidance, seed, steps, width, height, num, *slots],
            outputs=[results, faces, note],
        )  # fmt: skip

    def _bank_tab(self):
        import gradio as gr

        with gr.Row():
            with gr.Column():
                name = gr.Textbox(label="Name (letters, digits, _ . -)")
                photos = gr.File(label="Photos of the person", file_count="multiple", file_types=["image"])
                with gr.Accordion("Mix another face in", open=False):
                    mix = gr.File(label="Faces to mix in", file_count="multiple", file_types=["image"])
                    mix_scale = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Mix scale")
                overwrite = gr.Checkbox(label="Replace an identity of the same name")
                save = gr.Button("Save identity", variant="primary")
            with gr.Column():
                table = gr.Markdown()
                victim = gr.Dropdown(label="Delete a stored identity", choices=[], value=None)
                delete = gr.Button("Delete", variant="stop")
                status = gr.Markdown()
        return name, photos, mix, mix_scale, overwrite, save, table, victim, delete, status

    def build(self):
        import gradio as gr

        lim = self.config.limits
        with gr.Blocks(title="UniPortrait", analytics_enabled=False) as demo:
            gr.Markdown(
                f"# UniPortrait\nIdentity-preserving generation of one or several people "
                f"(model: `{self.config.preset}`). Limits: {lim.max_steps} steps, {lim.max_images} images, "
                f"{lim.max_identities} people, {lim.max_upload_bytes / MB:g} MB per photo. "
                "REST API: [/docs](/docs)."
            )
            with gr.Tab("Single ID"):
                self._generate_tab("single", 1, default_structure_scale(1))
            with gr.Tab("Multi ID"):
                self._generate_tab(
                    "multi", max(2, min(MULTI_ID_SLOTS, lim.max_identities)), default_structure_scale(2)
                )
            with gr.Tab("Identity bank"):
                name, photos, mix, mix_scale, overwrite, save, table, victim, delete, status = (
                    self._bank_tab()
                )
            listing = [table, victim, *self.stored_dropdowns]
            save.click(
                guarded(self.add_identity), [name, photos, mix, mix_scale, overwrite], [status, *listing]
            )
            delete.click(guarded(self.remove_identity), [victim], [status, *listing])
            demo.load(self.refresh, None, listing)
        demo.queue(
            max_size=self.config.queue_size + self.config.workers,
            default_concurrency_limit=self.config.workers,
        )
        return demo
