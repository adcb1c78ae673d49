"""`faceadapt restore`: restore every face of files or folders of photos."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from tqdm import tqdm

from cli.app import app
from cli.checks import check_detector, check_device, check_outdir, check_restorer, make_outdir
from cli.errors import fail
from cli.models import service_model
from restoration.faces import (DETAIL_RATIO, FORMATS, ImageError, MAX_NATURALNESS_DROP_DB, MIN_DETAIL_KEPT,
                               MIN_LOWPASS_DB, MIN_NOISE_NATURALNESS_GAIN_DB, demo_model_warning, load_image,
                               mode_counts, save_image, sniff_format)
from restoration.settings import get_settings
from service.registry import open_zoo

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
#: the face_info keys summary.json reports per face
FACE_KEYS = ("native_size", "mode", "fidelity", "planned", "reason", "check")


def collect_inputs(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise typer.BadParameter(f"{p}: no such file or folder", param_hint="INPUT")
    return files


def output_suffix(f: Path, fmt: str | None) -> str:
    """The output's suffix: ``fmt``'s when given, else the input's own when it is a format we write (.png, .jpg,
    .jpeg, .webp), else .png (BMP and TIFF inputs)."""
    if fmt is not None:
        return FORMATS[fmt][1][0]
    sfx = f.suffix.lower()
    return sfx if any(sfx in s for _, s in FORMATS.values()) else ".png"


def output_names(files: list[Path], fmt: str | None = None) -> list[str]:
    """`<stem><suffix>` per input (:func:`output_suffix`); inputs that would share a name get `<stem>_<n><suffix>`."""
    names, used = [], set()
    for f in files:
        sfx = output_suffix(f, fmt)
        name, n = f"{f.stem}{sfx}", 1
        while name in used:
            name, n = f"{f.stem}_{n}{sfx}", n + 1
        used.add(name)
        names.append(name)
    return names


def not_an_image(f: Path) -> str | None:
    """Why ``f`` is not an image we read, from its first bytes (nothing decoded), or None."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if not head:
        return "the file is empty"
    fmt = sniff_format(head)
    if fmt is None:
        text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
        what = "it holds text" if text else "not a format we know"
        return f"not an image ({what}, whatever its name says); restore reads PNG, JPEG, WebP, BMP and TIFF"
    if fmt not in ("png", "jpeg", "webp", "bmp", "tiff"):
        return f"a {fmt.upper()} file; restore reads PNG, JPEG, WebP, BMP and TIFF"
    return None


def _face_info(extra: dict, box=None) -> dict:
    info = {"box": [round(float(v), 1) for v in box]} if box is not None else {}
    return info | {k: extra[k] for k in FACE_KEYS if k in extra}


@app.command("restore")
def restore(
    inputs: List[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
    outdir: Path = typer.Option(..., "-o", "--outdir", help="Folder for the restored images and summary.json (created "
                                "once every check has passed)."),
    model: Optional[str] = typer.Option(None, "--model", help="Zoo restorer (default: FACEADAPT_DEFAULT_RESTORER)."),
    tenant: Optional[str] = typer.Option(
        None, "--tenant", help="Use the model --model of this tenant of the service on this home (its own, else a "
        "public one, as the API would), fetched through the service's registry."),
    aligned: bool = typer.Option(False, "--aligned", help="Inputs are aligned face crops: no detection."),
    only_center_face: bool = typer.Option(False, "--only-center-face", help="Restore only the face nearest the centre."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto (default: FACEADAPT_DEVICE)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Faces per network pass."),
    detector: Optional[str] = typer.Option(None, "--detector", help="auto, retinaface or mtcnn (default: "
                                           "FACEADAPT_DETECTOR)."),
    fidelity: Optional[float] = typer.Option(
        None, "--fidelity", "--weight", min=0.0, max=1.0,
        help=f"0 = fully restored ... 1 = the face left as it is (default: auto, by the face's native size: faces "
             f"larger than {DETAIL_RATIO:g}x the model input keep their own fine detail; and never worse: a face whose "
             f"result would lose detail, change or look less natural to the face prior FACEADAPT_GUARD_PRIOR falls "
             f"back to detail-preserving, else is kept). CodeFormer takes it as its w."),
    out_format: Optional[str] = typer.Option(
        None, "--format", help="png, jpeg or webp (default: the input's own format; BMP and TIFF inputs give PNG)."),
    color: bool = typer.Option(False, "--color", help="Let a gray photo's faces come out in colour (default: a gray "
                               "input stays gray)."),
):
    """Restore faces: detect, align, restore and paste back (or restore aligned crops directly)."""
    # everything is checked before anything is created or any work starts
    fmt = None
    if out_format is not None:
        fmt = {"jpg": "jpeg"}.get(out_format.strip().lower(), out_format.strip().lower())
        if fmt not in OUTPUT_FORMATS:
            fail(f"--format: unknown format {out_format!r}; use one of {', '.join(OUTPUT_FORMATS)}", 2)
    files = collect_inputs(inputs)
    if not files:
        fail("no images found in the inputs", 2)
    check_outdir(outdir)
    device = check_device(device)
    if not aligned or detector is not None:
        detector = check_detector(detector, need_weights=not aligned)  # aligned crops need no detector
    refused = {f: why for f in files if (why := not_an_image(f))}  # from the first bytes: nothing decoded yet
    if len(refused) == len(files):
        if len(files) == 1:
            fail(f"{files[0]}: {refused[files[0]]}", 1)
        fail(f"none of the {len(files)} inputs is an image we read (e.g. {files[0]}: {refused[files[0]]})", 1)
    zoo = None
    if tenant is not None:  # the tenant's registered model, by the API's rules, fetched through the registry
        zoo, model = open_zoo(service_model(model or "default", tenant))
    restorer = check_restorer(model, zoo, device, batch_size)
    make_outdir(outdir)
    warning = demo_model_warning(restorer.card)
    if warning:
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    names = output_names(files, fmt)
    summary = {"model": restorer.card.name, "device": str(restorer.device), "aligned": aligned,
               "batch_size": batch_size, "fidelity": "auto" if fidelity is None else fidelity,
               "detail_ratio": DETAIL_RATIO, "model_input_size": restorer.size, "color": color,
               "never_worse": {"on": fidelity is None, "min_detail_kept": MIN_DETAIL_KEPT,
                               "min_lowpass_db": MIN_LOWPASS_DB,
                               "guard_prior": get_settings().guard_prior if restorer.guard_prior is not None else None,
                               "max_naturalness_drop_db": MAX_NATURALNESS_DROP_DB,
                               "min_noise_naturalness_gain_db": MIN_NOISE_NATURALNESS_GAIN_DB},
               "files": []}
    t_start = time.perf_counter()
    bar = tqdm(total=len(files), unit="img", desc="restore")
    todo = []
    for f, n in zip(files, names):
        if f in refused:
            summary["files"].append({"input": str(f), "error": refused[f]})
            bar.update(1)
        else:
            todo.append((f, n))

    if aligned:
        # Aligned crops of many files share each network pass.
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            t0 = time.perf_counter()
            imgs, ok = [], []
            for f, n in chunk:
                try:
                    imgs.append(load_image(f))
                    ok.append((f, n))
                except ImageError as exc:
                    summary["files"].append({"input": str(f), "error": str(exc)})
            results = restorer.restore_aligned(imgs, fidelity=fidelity, color=color) if imgs else []
            dt = (time.perf_counter() - t0) / max(len(ok), 1)
            for (f, n), res in zip(ok, results):
                save_image(outdir / n, res.image)
                summary["files"].append({"input": str(f), "output": n, "faces": 1, "gray": res.gray,
                                         "face_info": [_face_info(res.faces[0].extra)], "seconds": round(dt, 4)})
            bar.update(len(chunk))
    else:
        for f, n in todo:
            t0 = time.perf_counter()
            try:
                img = load_image(f)
            except ImageError as exc:
                summary["files"].append({"input": str(f), "error": str(exc)})
                bar.update(1)
                continue
            res = restorer.restore_image(img, only_center_face=only_center_face, detector=detector,
                                         fidelity=fidelity, color=color)
            save_image(outdir / n, res.image)
            summary["files"].append({
                "input": str(f), "output": n, "faces": len(res.faces), "detector": res.detector, "gray": res.gray,
                "boxes": [[round(float(v), 1) for v in face.box] for face in res.faces],
                "face_info": [_face_info(face.extra, face.box) for face in res.faces],
                "seconds": round(time.perf_counter() - t0, 4),
            })
            bar.update(1)
    bar.close()
    _report(summary, files, outdir, restorer, t_start)


def _report(summary: dict, files: list[Path], outdir: Path, restorer, t_start: float) -> None:
    """Write summary.json and print the summary: files, faces by mode, the faces that fell back and why."""
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    errors = [f for f in summary["files"] if "error" in f]
    faces = sum(f.get("faces", 0) for f in summary["files"])
    infos = [(f, k, i) for f in summary["files"] for k, i in enumerate(f.get("face_info", []), 1)]
    counts = mode_counts([i for _, _, i in infos])
    summary["modes"] = counts
    fell = [(f, k, i) for f, k, i in infos if i.get("reason")]
    summary["fell_back"] = len(fell)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    modes = ", ".join(f"{v} {k}" for k, v in counts.items()) or "none"
    typer.echo(f"restored {len(files) - len(errors)} file(s), {faces} face(s) with {restorer.card.name} "
               f"in {summary['seconds']} s -> {outdir}")
    typer.echo(f"  faces: {modes} (fidelity {summary['fidelity']}; model input {restorer.size} px, faces above "
               f"{int(DETAIL_RATIO * restorer.size)} px keep their own detail; per face in summary.json)")
    if fell:
        typer.echo(f"  never worse: {len(fell)} face(s) fell back rather than come out worse than the input:")
        for f, k, i in fell[:10]:
            typer.echo(f"    {Path(f['input']).name} face {k} ({i['native_size']:g} px): {i['reason']}")
        if len(fell) > 10:
            typer.echo(f"    ... and {len(fell) - 10} more in summary.json")
    gray = sum(1 for f in summary["files"] if f.get("gray"))
    if gray:
        typer.echo(f"  {gray} gray input(s) kept gray (--color lets their faces take colour)")
    for e in errors:
        typer.secho(f"skipped {e['input']}: {e['error']}", err=True, fg=typer.colors.YELLOW)
    if errors and len(errors) == len(files):
        raise typer.Exit(1)
