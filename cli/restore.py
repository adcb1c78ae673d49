"""`faceadapt restore`: restore every face of files or folders of photos."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from tqdm import tqdm

from cli.app import app
from cli.checks import check_detector, check_device, check_outdir
from cli.errors import fail
from cli.models import service_model
from restoration.faces import (DETAIL_RATIO, ImageError, Restorer, demo_model_warning, load_image, mode_counts,
                               save_image)
from restoration.models import ZooError
from service.registry import open_zoo

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


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


def output_names(files: list[Path]) -> list[str]:
    """`<stem>.png` per input; inputs that share a stem get `<stem>_<n>.png`."""
    names, used = [], set()
    for f in files:
        name, n = f"{f.stem}.png", 1
        while name in used:
            name, n = f"{f.stem}_{n}.png", n + 1
        used.add(name)
        names.append(name)
    return names


@app.command("restore")
def restore(
    inputs: List[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
    outdir: Path = typer.Option(..., "-o", "--outdir", help="Folder for the restored PNGs and summary.json."),
    model: Optional[str] = typer.Option(None, "--model", help="Zoo restorer (default: FACEADAPT_DEFAULT_RESTORER)."),
    tenant: Optional[str] = typer.Option(
        None, "--tenant", help="Use the model --model of this tenant of the service on this home (its own, else a "
        "public one, as the API would), fetched through the service's registry."),
    aligned: bool = typer.Option(False, "--aligned", help="Inputs are aligned face crops: no detection."),
    only_center_face: bool = typer.Option(False, "--only-center-face", help="Restore only the face nearest the centre."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto (default: FACEADAPT_DEVICE)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Faces per network pass."),
    detector: Optional[str] = typer.Option(None, "--detector", help="auto, retinaface or mtcnn."),
    fidelity: Optional[float] = typer.Option(
        None, "--fidelity", "--weight", min=0.0, max=1.0,
        help="0 = fully restored ... 1 = the face left as it is (default: auto, by the face's native size: faces "
             "larger than 2x the model input keep their own fine detail). CodeFormer takes it as its w."),
):
    """Restore faces: detect, align, restore and paste back (or restore aligned crops directly)."""
    # everything is checked before any work starts
    files = collect_inputs(inputs)
    if not files:
        fail("no images found in the inputs", 2)
    check_outdir(outdir)
    device = check_device(device)
    if not aligned or detector is not None:
        detector = check_detector(detector, need_weights=not aligned)  # aligned crops need no detector
    zoo = None
    if tenant is not None:  # the tenant's registered model, by the API's rules, fetched through the registry
        zoo, model = open_zoo(service_model(model or "default", tenant))
    try:
        restorer = Restorer.from_zoo(model, zoo=zoo, device=device, batch_size=batch_size)
    except (ZooError, ValueError) as exc:
        fail(exc, 2)
    if restorer.card.kind != "restorer":
        fail(f"--model {restorer.card.name}: it is a {restorer.card.kind}, not a restorer", 2)
    warning = demo_model_warning(restorer.card)
    if warning:
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    names = output_names(files)
    summary = {"model": restorer.card.name, "device": str(restorer.device), "aligned": aligned,
               "batch_size": batch_size, "fidelity": "auto" if fidelity is None else fidelity,
               "detail_ratio": DETAIL_RATIO, "model_input_size": restorer.size, "files": []}
    t_start = time.perf_counter()
    bar = tqdm(total=len(files), unit="img", desc="restore")

    if aligned:
        # Aligned crops of many files share each network pass.
        for i in range(0, len(files), batch_size):
            chunk, chunk_names = files[i : i + batch_size], names[i : i + batch_size]
            t0 = time.perf_counter()
            imgs, ok = [], []
            for f, n in zip(chunk, chunk_names):
                try:
                    imgs.append(load_image(f))
                    ok.append((f, n))
                except ImageError as exc:
                    summary["files"].append({"input": str(f), "error": str(exc)})
            outs, infos = restorer.restore_crops(imgs, fidelity=fidelity, return_info=True) if imgs else ([], [])
            dt = (time.perf_counter() - t0) / max(len(ok), 1)
            for (f, n), out, info in zip(ok, outs, infos):
                save_image(outdir / n, out)
                summary["files"].append({"input": str(f), "output": n, "faces": 1, "face_info": [info],
                                         "seconds": round(dt, 4)})
            bar.update(len(chunk))
    else:
        for f, n in zip(files, names):
            t0 = time.perf_counter()
            try:
                img = load_image(f)
            except ImageError as exc:
                summary["files"].append({"input": str(f), "error": str(exc)})
                bar.update(1)
                continue
            res = restorer.restore_image(img, only_center_face=only_center_face, detector=detector,
                                         fidelity=fidelity)
            save_image(outdir / n, res.image)
            summary["files"].append({
                "input": str(f), "output": n, "faces": len(res.faces), "detector": res.detector,
                "boxes": [[round(float(v), 1) for v in face.box] for face in res.faces],
                "face_info": [{"box": [round(float(v), 1) for v in face.box],
                               **{k: face.extra[k] for k in ("native_size", "mode", "fidelity") if k in face.extra}}
                              for face in res.faces],
                "seconds": round(time.perf_counter() - t0, 4),
            })
            bar.update(1)
    bar.close()
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    errors = [f for f in summary["files"] if "error" in f]
    faces = sum(f.get("faces", 0) for f in summary["files"])
    counts = mode_counts([i for f in summary["files"] for i in f.get("face_info", [])])
    summary["modes"] = counts
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    modes = ", ".join(f"{v} {k}" for k, v in counts.items()) or "none"
    typer.echo(f"restored {len(files) - len(errors)} file(s), {faces} face(s) with {restorer.card.name} "
               f"in {summary['seconds']} s -> {outdir}")
    typer.echo(f"  faces: {modes} (fidelity {summary['fidelity']}; model input {restorer.size} px, faces above "
               f"{int(DETAIL_RATIO * restorer.size)} px keep their own detail; per face in summary.json)")
    for e in errors:
        typer.secho(f"skipped {e['input']}: {e['error']}", err=True, fg=typer.colors.YELLOW)
    if errors and len(errors) == len(files):
        raise typer.Exit(1)
