"""What a run reads: the model to prune, its teachers and the data (datasets and their transforms).

Models: a timm name with a local checkpoint, timm's ``local-dir:FOLDER`` (config.json + weights), a saved
NViT model, or the embedded default. Data: the embedded subset, an image folder, or any map-style
dataset timm's ``create_dataset`` reads (e.g. ``hfds/NAME``), with timm's transforms.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .settings import RunError


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
LOCAL_DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # timm's hub layout, in its order of preference


def read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "model_ema"):
                if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
    except Exception as e:  # torch/safetensors raise many types for a bad file
        raise RunError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def shape_overrides(name: str, state: dict, s: dict) -> dict:
    """create_model kwargs the checkpoint fixes: classifier width (whatever module timm's pretrained
    config names as the classifier: 'head', 'head.fc', …) and depth (a Swin: its stages' shapes)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    heads = cfg.classifier if cfg is not None and cfg.classifier else "head"
    kw = {}
    for head in [heads] if isinstance(heads, str) else list(heads):
        if f"{head}.weight" in state:
            kw["num_classes"] = state[f"{head}.weight"].shape[0]
            break
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        kw["depth"] = max(blocks) + 1
    from .families.swin import timm_shape_kwargs

    try:
        kw.update(timm_shape_kwargs(state))  # a Swin's stages (depths, heads, widths, windows)
    except ValueError as e:
        raise RunError(f"checkpoint of {name}: {e}") from None
    if s.get("img_size"):
        kw["img_size"] = s["img_size"]
    if s.get("in_chans"):
        kw["in_chans"] = s["in_chans"]
    return kw


def load_timm_model(spec: str, checkpoint: str | None, s: dict, what: str = "--model") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, provenance) from a timm name + checkpoint or a local-dir:FOLDER."""
    import timm

    if spec.startswith("local-dir:"):
        folder = Path(spec.removeprefix("local-dir:"))
        if not (folder / "config.json").is_file():
            raise RunError(f"{what} {spec}: no config.json in {folder} (timm's hub layout: config.json with "
                           f"'architecture' and 'model_args', plus model.safetensors or pytorch_model.bin)")
        weights = [folder / f for f in LOCAL_DIR_WEIGHTS if (folder / f).is_file()]
        if not weights:
            raise RunError(f"{what} {spec}: no weights in {folder} (expected one of {', '.join(LOCAL_DIR_WEIGHTS)})")
        kw = {k: s[k] for k in ("img_size", "in_chans") if s.get(k)}
        try:  # timm reads config.json (architecture, model_args, pretrained cfg) and builds the model
            model = timm.create_model(spec, pretrained=False, **kw)
        except Exception as e:  # timm raises RuntimeError/KeyError/FileNotFoundError for bad folders
            raise RunError(f"{what} {spec} cannot be built ({type(e).__name__}: {e})") from None
        # The weights are read here (safetensors or a torch state dict, strictly): timm < 1.0.2x
        # torch.load()s a local folder's model.safetensors.
        try:
            model.load_state_dict(read_state_dict(weights[0]))
        except RuntimeError as e:
            raise RunError(f"{what} {spec}: {weights[0].name} does not fit the architecture in config.json: "
                           f"{e}") from None
        return model.eval(), {"source": "timm-local-dir", "model": spec, "weights": weights[0].name}
    if not timm.is_model(spec):
        close = timm.list_models(f"*{spec.split('_')[0]}*")[:8]
        raise RunError(f"{what}: unknown timm model {spec!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    ck = Path(checkpoint)
    if not ck.is_file():
        raise RunError(f"checkpoint {ck} not found")
    state = read_state_dict(ck)
    try:
        model = timm.create_model(spec, pretrained=False, **shape_overrides(spec, state, s))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError) as e:
        raise RunError(f"checkpoint {ck} does not fit {spec}: {e}") from None
    if missing or unexpected:
        raise RunError(f"checkpoint {ck} does not fit {spec}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), {"source": "timm", "model": spec, "checkpoint": str(ck)}


def load_dense_model(s: dict) -> tuple[torch.nn.Module, dict]:
    """The model to prune (eval mode) and its provenance."""
    if s["nvit_model"]:
        import nvit

        p = Path(s["nvit_model"])
        if not p.exists():
            raise RunError(f"--nvit-model {p} does not exist")
        try:
            return nvit.load(p), {"source": "nvit", "path": str(p)}
        except ValueError as e:
            raise RunError(str(e)) from None
    if s["model"]:
        return load_timm_model(s["model"], s["checkpoint"], s)
    from .tiny_model import EMBEDDED_MODEL, WEIGHTS_PATH, create_embedded_model

    return create_embedded_model(pretrained=True), {"source": "embedded", "model": "nvit.tiny_model",
                                                    "config": EMBEDDED_MODEL, "checkpoint": WEIGHTS_PATH.name}


def load_teachers(s: dict, dense: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None, dict]:
    """(soft teacher, hard-label teacher or None, provenance); frozen, eval mode. Default soft teacher: a
    copy of the dense model."""
    import copy

    if s["teacher"]:
        teacher, prov = load_timm_model(s["teacher"], s["teacher_checkpoint"], {}, "--teacher")
    else:
        teacher, prov = copy.deepcopy(dense), {"source": "dense model"}
    hard, hard_prov = None, None
    if s["hard_teacher"]:
        hard, hard_prov = load_timm_model(s["hard_teacher"], s["hard_teacher_checkpoint"], {}, "--hard-teacher")
        hard.eval().requires_grad_(False)
    return teacher.eval().requires_grad_(False), hard, {"soft": prov, "hard": hard_prov}


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    from .io import ARCHITECTURES

    if isinstance(model, tuple(m for m, _ in ARCHITECTURES.values())):  # NViT, NViT-Swin: from the config
        c = model.config
        img = c.img_size if isinstance(c.img_size, (tuple, list)) else (c.img_size, c.img_size)
        return c.in_chans, img[0], img[1]
    pe = model.patch_embed
    img = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
    return pe.proj.in_channels, img[0], img[1]


def check_teacher_input(teacher: torch.nn.Module, student_shape: tuple[int, int, int], what: str) -> None:
    """The teacher must take the student's images (same channels and size), checked before any work."""
    x = torch.zeros(1, *student_shape)
    try:
        with torch.no_grad():
            teacher.eval()(x)
    except Exception as e:
        raise RunError(f"{what} cannot take the student's {student_shape[0]}×{student_shape[1]}×{student_shape[2]} "
                       f"images ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
STREAMING = ("wds/", "hfids/", "tfds/")


def data_config(s: dict, model: torch.nn.Module) -> dict:
    """Preprocessing facts (input size, mean/std, crop, interpolation): the model's pretrained config,
    overridden by the flags."""
    from timm.data import resolve_data_config

    C, H, W = input_shape(model)
    args = {"input_size": (s["in_chans"] or C, s["img_size"] or H, s["img_size"] or W)}
    for k in ("crop_pct", "interpolation", "mean", "std"):
        if s[k] is not None:
            args[k] = s[k]
    for k in ("mean", "std"):
        if s[k] is not None and len(s[k]) not in (1, args["input_size"][0]):
            raise RunError(f"--{k} needs 1 or {args['input_size'][0]} values, got {list(s[k])}")
    cfg = resolve_data_config(args, model=model)
    if (s["in_chans"] or C) == 1 and s["mean"] is None:
        cfg["mean"], cfg["std"] = grayscale_normalisation(model)
    return cfg


def grayscale_normalisation(model: torch.nn.Module) -> tuple[tuple[float], tuple[float]]:
    """(mean, std) of a 1-channel input when no --mean/--std is given: the model's recorded preprocessing
    (its pretrained_cfg, e.g. what an nvit run or a grayscale timm config saved) when it has one channel;
    else the embedded data's statistics (ImageNet's RGB ones fit no grayscale input)."""
    from .datasets import EMBEDDED_MEAN, EMBEDDED_STD

    config = getattr(model, "config", None)  # an NViT model: what it recorded, not timm's filled-in defaults
    pc = config.data if hasattr(config, "data") else (getattr(model, "pretrained_cfg", None) or {})
    mean, std = pc.get("mean") or (), pc.get("std") or ()
    if len(mean) == 1 and len(std) == 1:
        return (float(mean[0]),), (float(std[0]),)
    return (EMBEDDED_MEAN,), (EMBEDDED_STD,)


def augmentation(s: dict) -> str:
    return s["augment"] if s["augment"] != "auto" else ("pad-crop" if not s["data"] else "timm")


def load_data(s: dict, model: torch.nn.Module, world: int = 1):
    """(train dataset, test dataset, per-sample train transform or None, description).

    Datasets return (tensor, label). Map-style ones (the embedded tensors, folders, hfds/…) draw their
    random train transforms from the global RNGs, which the loader seeds per sample (nvit.loader), so
    batches are reproducible. Streaming ones (wds/…, hfids/…, tfds/…) are timm's IterableImageDataset:
    timm shards them over ranks and workers, and their order is fixed by the seed and the epoch only."""
    from .datasets import EMBEDDED_PATH, load_embedded
    from .loader import pad_crop_flip

    aug = augmentation(s)
    C, H, _ = input_shape(model)
    extra = None
    if s["embedded_data"] and s["data"]:
        raise RunError("--embedded-data replaces the shipped tensors; it does not go with --data")
    if not s["data"]:
        if (s["in_chans"] or C, s["img_size"] or H) != (1, 28):
            raise RunError(f"the embedded data is 1×28×28 but the model takes {C}×{H}×{H}; give --data")
        if aug == "timm":
            raise RunError("--augment timm needs image data (--data); the embedded tensors take pad-crop or none")
        path = s["embedded_data"] or EMBEDDED_PATH
        if not Path(path).is_file():
            raise RunError(f"--embedded-data {path}: no such file")
        for k in ("mean", "std"):
            if s[k] is not None and len(s[k]) != 1:
                raise RunError(f"--{k}: the embedded data has 1 channel, got {len(s[k])} values")
        (mean,), (std,) = (tuple(s["mean"]), tuple(s["std"])) if s["mean"] is not None else grayscale_normalisation(model)
        try:
            train = load_embedded("train", path=path, limit=s["train_limit"], mean=mean, std=std)
            test = load_embedded("test", path=path, limit=s["eval_limit"], mean=mean, std=std)
        except ValueError as e:
            raise RunError(f"--embedded-data: {e}") from None
        desc = {"kind": "embedded", "name": "Fashion-MNIST subset" if not s["embedded_data"] else str(path),
                "preprocessing": {"mean": [mean], "std": [std], "crop_pct": 1.0}}
        if aug == "pad-crop":
            extra = pad_crop_flip(s["pad"], s["flip"], fill=(0.0 - mean) / std)
        desc.update(n_train=len(train), n_test=len(test), augmentation=aug)
        return train, test, extra, desc
    cfg = data_config(s, model)
    train, test, desc = _timm_datasets(s, cfg, aug, world)
    if not is_streaming(train):
        if s["train_limit"]:
            train = torch.utils.data.Subset(train, range(min(len(train), s["train_limit"])))
        if s["eval_limit"]:
            test = torch.utils.data.Subset(test, range(min(len(test), s["eval_limit"])))
    desc["preprocessing"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    desc.update(n_train=len(train), n_test=len(test), augmentation=aug)
    return train, test, extra, desc


def is_streaming(ds) -> bool:
    return isinstance(ds, torch.utils.data.IterableDataset)


def _timm_datasets(s: dict, cfg: dict, aug: str, world: int):
    from timm.data import create_dataset, create_transform
    from torchvision import transforms

    from .datasets import image_folder
    from .loader import pad_crop_flip

    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    eval_tf = create_transform(**cfg, is_training=False)
    if aug == "timm":
        train_tf = create_transform(**cfg, is_training=True, scale=s["scale"], ratio=s["ratio"], hflip=s["hflip"],
                                    auto_augment=s["aa"], re_prob=s["reprob"])
    elif aug == "pad-crop":  # after normalisation, padding with 0 pads with the mean colour
        train_tf = transforms.Compose([eval_tf, pad_crop_flip(s["pad"], s["flip"], fill=0.0)])
    else:
        train_tf = eval_tf
    data = s["data"]
    scheme = data.split("/", 1)[0] + "/" if "/" in data and not Path(data).exists() else ""
    if scheme in STREAMING or scheme == "hfds/":
        streaming = scheme in STREAMING
        kw = dict(root=s["data_root"], input_img_mode=mode)
        if streaming:  # timm shards the stream over ranks and workers and shuffles by (seed, epoch)
            kw.update(batch_size=s["batch_size"] // world, seed=s["seed"])
        try:
            train = create_dataset(data, split=s["train_split"], is_training=True, transform=train_tf,
                                   num_samples=s["train_limit"] if streaming else None, **kw)
            test = create_dataset(data, split=s["val_split"], is_training=False, transform=eval_tf,
                                  num_samples=s["eval_limit"] if streaming else None, **kw)
        except Exception as e:  # datasets/webdataset/timm raise many kinds for a missing or malformed dataset
            raise RunError(f"--data {data} cannot be read ({type(e).__name__}: {e})") from None
        return train, test, {"kind": "timm-streaming" if streaming else "timm-dataset", "name": data,
                             "root": s["data_root"]}
    root = Path(data)
    if not root.is_dir():
        raise RunError(f"--data {root} is not a folder (nor hfds/NAME, {', '.join(p + 'NAME' for p in STREAMING)})")
    try:
        train = image_folder(root, "train", train_tf, mode)
        try:
            test = image_folder(root, "val", eval_tf, mode)
        except FileNotFoundError:
            test = image_folder(root, "test", eval_tf, mode)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None
    return train, test, {"kind": "image-folder", "root": str(root)}
