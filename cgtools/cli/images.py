"""`cgtools images`: import an image set (built-in, folder, `datasets` dataset) into an image table."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cgtools.cli.options import ForceOpt, LimitOpt, OutOpt, SeedOpt

Opt = typer.Option


def images(
    source: Annotated[Optional[str], typer.Argument(
        help="'digits' (scikit-learn's 8x8 digits, the default), 'photos' (scikit-image's sample photographs), "
        "'noise' (uniform random pixels), an image folder (labels from its subfolders), or a `datasets` "
        "dataset on disk (.parquet, .arrow or a save_to_disk directory).", metavar="SOURCE",
        show_default=False)] = None,
    out: OutOpt = "-",
    split: Annotated[str, Opt("--split", help="The images written: 'all', or the 'train' or 'test' part of a "
                              "seeded split (disjoint; the same --seed and --test-fraction give the same split).",
                              metavar="SPLIT")] = "all",
    test_fraction: Annotated[float, Opt("--test-fraction", min=0.0, max=1.0, help="Fraction of the source in the "
                                        "test split (rounded; at least one image each side).", metavar="F")] = 0.2,
    size: Annotated[Optional[str], Opt("--size", help="Output size H or HxW: centre crop to the aspect ratio, "
                                       "then bicubic resize [default: the source's size; photos 64x64; required "
                                       "for noise and for sources of mixed sizes].", metavar="SIZE",
                                       show_default=False)] = None,
    channels: Annotated[Optional[int], Opt("--channels", min=1, max=3, help="1 (grey) or 3 (RGB) [default: the "
                                           "source's: digits and noise 1, photos 3, else 1 only if every image "
                                           "is grey].", metavar="C", show_default=False)] = None,
    limit: LimitOpt = None,
    num: Annotated[Optional[int], Opt("--num", "-n", min=1, help="Number of images of the noise source "
                                      "[default: 1000].", metavar="N", show_default=False)] = None,
    seed: SeedOpt = 0,
    image_column: Annotated[Optional[str], Opt("--image-column", help="Column holding the images in a `datasets` "
                                               "dataset [default: 'image', or its only Image column].",
                                               metavar="NAME", show_default=False)] = None,
    label_column: Annotated[Optional[str], Opt("--label-column", help="Column holding the labels in a `datasets` "
                                               "dataset [default: 'label' when there is one].", metavar="NAME",
                                               show_default=False)] = None,
    hub: Annotated[Optional[str], Opt("--hub", help="Read the Hugging Face hub dataset NAME instead of SOURCE "
                                      "(uses the network; nothing else does).", metavar="NAME")] = None,
    hub_split: Annotated[str, Opt("--hub-split", help="The split of the --hub dataset to read.",
                                  metavar="NAME")] = "train",
    force: ForceOpt = False,
) -> None:
    """Import an image set into an image table (Parquet as `datasets` writes an Image feature: PNG
    bytes and path, plus an int64 label when the source has labels).

    The rows are the --split of the source ('all' by default; 'train'/'test' from a permutation
    drawn from --seed, disjoint, in source order), at most --limit of them, converted to
    --channels and --size. The metadata records the source, the split and the provenance.
    Held-out real images (--split test) are the reference of `cgtools mmd`.

    Examples:

      cgtools images digits --split train -o digits_train.parquet

      cgtools images digits --split test -o digits_test.parquet

      cgtools images photos --size 32 -o photos.parquet

      cgtools images noise --size 8 -n 500 -o noise.parquet

      cgtools images my_pictures/ --size 64x64 --channels 3 -o mine.parquet
    """
    from cgtools.formats.metadata import provenance
    from cgtools.images.sources import SPLITS, import_images, load_source, parse_size

    if split not in SPLITS:
        raise typer.BadParameter(f"must be one of {', '.join(SPLITS)}", param_hint="--split")
    if channels == 2:
        raise typer.BadParameter("must be 1 or 3", param_hint="--channels")
    if test_fraction >= 1.0:
        raise typer.BadParameter("must be below 1", param_hint="--test-fraction")
    from cgtools.formats.files import check_output

    check_output(out, force)  # before reading anything
    shape = parse_size(size)
    src = load_source(source, hub=hub, hub_split=hub_split, image_column=image_column, label_column=label_column,
                      num=num, size=shape, channels=channels, seed=seed)
    prov = provenance("images", seed, src.inputs)
    import_images(src, out, force, provenance=prov, split=split, test_fraction=test_fraction, seed=seed,
                  limit=limit, size=shape, channels=channels)
