"""Convert camera DNG files to the single-channel 16-bit PNG mosaics that PyNET reads.

Faithful default (the reference's dng_to_png.py): ``python dng_to_png.py photo.dng`` writes rawpy's full
``raw_image`` (all sensor rows and columns, camera code values untouched) as ``photo.png``
beside the DNG. Beyond the reference, all optional:

* several files and/or folders at once (every ``*.dng``/``*.DNG`` in a folder), with a progress bar;
* ``output_dir=``: where the PNGs go;
* ``visible=true``: only LibRaw's visible area (``raw_image_visible``), without masked margins;
* ``rggb=true``: the Bayer pattern is read from the file and the mosaic loses its first row
  and/or column so that it starts with R at (0,0), as PyNET expects;
* ``normalize=true``: per-channel black level subtracted and the white level mapped to the
  10-bit range of the Huawei P20's IMX380 (black ``black_level``, white 1023);
* ``crop32=true``: height and width cut down (bottom/right) to multiples of 32, so that the
  packed image is a multiple of 16 and goes straight into test_model.py.

The pattern is always printed. X-Trans (6x6), Quad-Bayer and other non-Bayer files are refused
in every mode: PyNET's packing only makes sense for a 2x2 Bayer mosaic.
"""

import os
import sys

import numpy as np
from tqdm import tqdm

import camera
import cli
import dng
import files
import images

DNG_EXTENSIONS = (".dng",)


def output_path(dng_path: str, output_dir=None) -> str:
    folder, name = os.path.split(dng_path)
    stem, ext = os.path.splitext(name)
    if ext.lower() not in DNG_EXTENSIONS:
        raise cli.UserError(f"{dng_path}: expected a .dng file")
    return os.path.join(output_dir if output_dir else folder, stem + ".png")


def collect_inputs(paths) -> list:
    """Expand folders to their .dng/.DNG files (sorted; dotfiles and temporary files skipped);
    check that every path exists."""
    if not paths:
        raise cli.UsageError("no DNG file given (usage: python dng_to_png.py photo.dng [more.dng|folder ...])")
    found = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(path, n) for n in os.listdir(path)
                            if os.path.splitext(n)[1].lower() in DNG_EXTENSIONS and not files.is_hidden(n)
                            and os.path.isfile(os.path.join(path, n)))
            if not inside:
                raise cli.UserError(f"{path}: no .dng files in this folder")
            found.extend(inside)
        else:
            files.require_file(path)  # says why: missing, a loop of links...
            output_path(path)  # refuses other extensions
            found.append(path)
    return found


def convert(path, output_dir=None, visible=False, rggb=False, normalize=False, crop32=False,
            black_level=camera.BLACK_LEVEL, log=print) -> str:
    """Convert one DNG; returns the PNG path. ``log`` receives the per-file report lines."""
    mosaic, notes, pattern, info = dng.read_raw(path, visible, rggb, normalize, crop32, black_level)
    target = output_path(path, output_dir)
    images.write_png(target, mosaic.astype(np.uint16))
    log(f"{path}: {', '.join(notes)} -> {target} ({mosaic.shape[1]}x{mosaic.shape[0]})")
    if pattern != "RGGB" and not rggb:
        log("  note: PyNET expects RGGB; add rggb=true to start the mosaic with R at (0,0)")
    top = int(mosaic.max())
    if not normalize and top > camera.WHITE_LEVEL:
        log(f"  note: values up to {top} (white level {info['white_level']}) exceed PyNET's {camera.BITS}-bit range; "
            "add normalize=true")
    return target


SPEC = [
    cli.Arg("output_dir", str, None, "folder for the PNGs; none = beside each DNG"),
    cli.Arg("visible", cli.BOOL, False, "write LibRaw's visible area only (raw_image_visible)"),
    cli.Arg("rggb", cli.BOOL, False, "drop the first row/column as needed so the mosaic starts with R at (0,0)"),
    cli.Arg("normalize", cli.BOOL, False, "subtract the black level and map the white level to 10 bits (1023)"),
    cli.Arg("black_level", int, camera.BLACK_LEVEL, "black level of the normalized output (IMX380-like pedestal)",
            check=lambda v: None if 0 <= v < camera.WHITE_LEVEL else f"a value from 0 to {camera.WHITE_LEVEL - 1}"),
    cli.Arg("crop32", cli.BOOL, False, "cut height and width to multiples of 32 (for test_model.py)"),
]


def main(argv):
    args = cli.parse_args(argv, SPEC, "dng_to_png.py",
                          "Write each DNG's Bayer mosaic as a 16-bit PNG: "
                          "python dng_to_png.py photo.dng [more.dng|folder ...] [key=value ...]",
                          positional="files")
    paths = collect_inputs(args["files"])
    if args["output_dir"]:
        files.check_output_dir(args["output_dir"], "output_dir")
    targets = {}
    for path in paths:
        target = output_path(path, args["output_dir"])
        if target in targets:
            raise cli.UserError(f"{path} and {targets[target]} would both be written to {target}")
        targets[target] = path
    for folder in sorted({os.path.dirname(t) or "." for t in targets}):
        files.remove_stale_temps(folder)
    options = {k: args[k] for k in ("output_dir", "visible", "rggb", "normalize", "crop32", "black_level")}
    if len(paths) == 1:
        convert(paths[0], **options)
        return
    failed = []
    with tqdm(paths, unit="file", file=sys.stderr) as bar:
        for path in bar:
            try:
                convert(path, log=tqdm.write, **options)
            except cli.UserError as err:
                failed.append(path)
                tqdm.write(f"warning: {err}", file=sys.stderr)
    if failed:
        raise cli.UserError(f"{len(failed)} of {len(paths)} files could not be converted "
                            f"(first: {failed[0]}; see the warnings above)")
    print(f"converted {len(paths)} files")


if __name__ == "__main__":
    sys.exit(cli.run(main))
