"""The shared base of every config in `configs/`: paper defaults (DiT, DESIGN.md §5), and
`load_config`, which reads a config file as `--config` does.

Config files call `get_base_config()` (or a paper's recipe built on it, `config_recipes`) and
change what their model needs. The base lives in the package (not in `configs/`) so that it
imports the same way from `main`, tests, benchmarks and notebooks, wherever the config file
itself is.
"""
from ml_collections import ConfigDict


def get_base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # base seed: parameter init and the per-step randomness fold_in(key, step)

    c.model = ConfigDict()
    c.model.backbone = "dit"          # "dit" | "adm" (ADM UNet: model.name="ADM", see model.unet)
    c.model.name = "DiT-XL/2"         # "DiT-{S,B,L,XL}/{2,4,8}" or "custom" (set the 4 below)
    c.model.depth = None              # overrides of the named size (None = from the name)
    c.model.hidden_size = None
    c.model.num_heads = None
    c.model.patch_size = None
    c.model.head_dim = None           # attention head width (DiffMoE option; None = width/heads)
    c.model.input_size = 32           # model input H = W (32 = 256px images as SD latents)
    c.model.in_channels = 4           # model input channels (4 = SD latents)
    c.model.num_classes = 1000        # 1 = unconditional (one learned label row, as official)
    c.model.class_dropout_prob = 0.1  # label dropout for classifier-free guidance
    c.model.conditioning = "class"    # "class" | "text" (T2I: cross-attention to CLIP tokens)
    c.model.text_width = 768          # text token width (CLIP ViT-L/14's text tower: 768)
    c.model.text_length = 77          # text tokens per caption (CLIP: 77)
    c.model.caption_dropout_prob = 0.1  # caption dropout for CFG (text models: the empty caption)
    c.model.learn_sigma = True        # predict the variance too (IDDPM hybrid loss mse + vb)
    c.model.mlp_ratio = 4.0           # FFN width / model width
    c.model.compute_dtype = "float32"  # matmul dtype: "float32" | "bfloat16" (params stay f32)
    c.model.attention_impl = "auto"   # "auto" (cuDNN flash on GPU in 16-bit, else XLA) | "xla" | "cudnn"
    c.model.routing = ConfigDict()    # task routing (DTR / R-TR / Switch-DiT)
    # "none" | "dtr" | "random" (R-TR) | "switch" (Switch-DiT) | "cdtr" | "ercddt" |
    # "maxroaming" (DTR Table 8)
    c.model.routing.kind = "none"
    c.model.routing.num_tasks = 1000  # T: one task per training timestep
    c.model.routing.alpha = 4.0       # DTR window shift exponent (and Switch-DiT's prior map)
    c.model.routing.beta = 0.8        # DTR / R-TR activated channel fraction
    c.model.routing.seed = 0          # R-TR channel draw (a table per block) / random allocation
    c.model.routing.clusters = 8      # CDTR / ERCDDT / MaxRoaming timestep clusters
    c.model.routing.roaming_period = 1000  # MaxRoaming: training steps between channel swaps
    # MaxRoaming masks when sampling: those of this training step (-1 = after every swap)
    c.model.routing.roaming_sample_step = -1
    c.model.routing.num_experts = 3   # Switch-DiT M experts per block
    c.model.routing.top_k = 2         # Switch-DiT k active experts
    c.model.routing.integration = "mask_skip_init"  # direct | mask | mask_skip | mask_skip_init
    c.model.routing.noisy_gating = False  # noisy top-k gating (Table 1 ablation)
    c.model.routing.allocation = "learned"  # "learned" | "random" (Table 5 ablation)
    c.model.ffn = ConfigDict()        # feed-forward networks (dense, or DiffMoE-paper mixtures)
    c.model.ffn.kind = "mlp"          # "mlp" | "diffmoe" | "token_choice" | "expert_choice"
    c.model.ffn.num_experts = 16      # E experts per mixture layer
    c.model.ffn.every = 2             # a mixture in every 2nd block ...
    c.model.ffn.first = 1             # ... from block 1: the odd blocks, as DiffMoE
    c.model.ffn.capacity = 1.0        # C_train (DiffMoE, EC-DiT)
    c.model.ffn.top_k = 1             # TC-DiT experts per token
    c.model.ffn.threshold_decay = 0.95  # DiffMoE threshold EMA
    # DiffMoE inference: "dynamic" (learned thresholds) | "interval" (constant γ) | "static"
    # (no capacity predictor: each expert takes its top int(static_capacity · pool / E) tokens)
    c.model.ffn.inference = "dynamic"
    c.model.ffn.interval_threshold = 0.5  # γ of the interval search
    c.model.ffn.static_capacity = 1.0  # C of the static inference (Table 4: 0.9, 0.95, 1)
    c.model.ffn.swiglu = False        # SwiGLU experts and dense FFNs (official use_swiglu)
    # Official n_shared_experts: an always-on expert added to every mixture's output (DiffMoE:
    # one GELU MLP of twice the expert width when > 0; TC-/EC-DiT: a SwiGLU of width n·D).
    c.model.ffn.shared_experts = 0
    # Official DiffMoE / EC-DiT capacity_schedule (stage_I_iters, stage_II_iters): C_train = E
    # until stage I, then linear down to ffn.capacity at stage II; () = a constant C_train.
    c.model.ffn.capacity_schedule = ()
    # EC-DiT inference: "static" (top int(S/E·C) per sample) | "dynamic" (DiffMoE Table 8's
    # "Local Dynamic Intra-sample Routing": a capacity predictor and thresholds per sample)
    c.model.ffn.ec_inference = "static"
    c.model.unet = ConfigDict()       # the ADM UNet (backbone="adm"): guided-diffusion's options
    c.model.unet.model_channels = 128  # base width (guided-diffusion's num_channels)
    c.model.unet.channel_mult = ()    # width multipliers per resolution; () = ADM's for input_size
    c.model.unet.num_res_blocks = 2   # ResBlocks per resolution
    c.model.unet.attention_resolutions = (16, 8)  # feature-map sizes (pixels) with attention
    c.model.unet.num_heads = 4        # attention heads (when num_head_channels == -1)
    c.model.unet.num_head_channels = -1  # channels per head (-1 = use num_heads)
    c.model.unet.use_scale_shift_norm = True  # AdaGN (timestep embedding scales/shifts the norm)
    c.model.unet.resblock_updown = False  # ResBlocks, not plain convs, down/upsample
    c.model.unet.use_new_attention_order = False  # split q, k, v before the heads
    c.model.unet.dropout = 0.0        # dropout inside every ResBlock

    c.diffusion = ConfigDict()
    c.diffusion.objective = "gaussian"  # "gaussian" (DDPM/IDDPM) | "flow" (rectified flow)
    c.diffusion.schedule = "linear"     # beta schedule: "linear" (DiT) | "cosine" (IDDPM)
    c.diffusion.num_timesteps = 1000    # T of the training process
    # Training timesteps [lo, hi) ((0, 0) = all T): a multi-experts member trains on its own
    # interval only (Switch-DiT Table A, DTR Table 6; switch_dit_jax/multi_expert.py samples).
    c.diffusion.t_range = (0, 0)

    c.loss = ConfigDict()
    c.loss.weighting = "constant"     # eps-MSE weights: "constant" | "min_snr" | "p2" | "ant_uw"
    c.loss.min_snr_gamma = 5.0        # Min-SNR-γ
    c.loss.p2_gamma = 1.0             # P2 γ
    c.loss.p2_k = 1.0                 # P2 k
    c.loss.uw_clusters = 8            # ANT-UW timestep clusters
    c.loss.uw_learning_rate = 0.025   # ANT-UW log-variance learning rate (Adam)
    c.loss.prior_weight = 1.0         # λ_dp of the Switch-DiT diffusion prior loss (0 = off)
    c.loss.load_balance_weight = 0.0  # Switch-DiT / TC-DiT load-balancing loss weight (0 = off)
    c.loss.capacity_weight = 1.0      # λ_cp of the DiffMoE capacity-predictor BCE

    c.data = ConfigDict()
    # "digits" | "digits_text" (digits with synthetic captions) | "latents" (COCO latents
    # carry captions) | "tfds" | "pixels" (uint8 ArrayRecord)
    c.data.name = "latents"
    c.data.dir = ""                # latents, pixels: shard directory; tfds: data_dir
    c.data.tfds_name = "imagenet2012"  # tfds dataset name (data.name == "tfds")
    c.data.split = "train"         # tfds split
    c.data.image_size = 256        # tfds: ADM centre crop + resize to this size
    # Random horizontal flips. Off by default: latents extracted by this package already hold
    # every image and its mirror (data/extract.py); turn on for raw tfds images.
    c.data.hflip = False
    c.data.latent_scale = 0.18215  # SD VAE latent scaling
    c.data.num_workers = 0         # grain worker processes (0 = in the training process)
    c.data.seed = 0                # shuffle and augmentation seed

    c.text = ConfigDict()
    # Hugging Face CLIP directory (config.json, model.safetensors, tokenizer.json): encodes the
    # digits_text captions, prompts and the CLIP score ("" = no text conditioning).
    c.text.encoder_dir = ""

    c.vae = ConfigDict()              # decodes latent samples (data.name == "latents") to images
    c.vae.weights = ""                # its diffusion_pytorch_model.safetensors ("" = keep latents)
    c.vae.block_out_channels = (128, 256, 512, 512)  # VAE widths per resolution (SD 1.x VAE)
    c.vae.layers_per_block = 2        # resnets per encoder block; decoder blocks have one more
    c.vae.norm_num_groups = 32        # GroupNorm groups (must divide every width)
    c.vae.latent_channels = 4         # latent channels (= model.in_channels)
    c.vae.batch_size = 32             # latents per decoding batch over all devices

    c.train = ConfigDict()
    c.train.global_batch_size = 256  # images per step over all devices and hosts
    c.train.num_steps = 400_000      # total optimizer steps (a resumed run stops here too)
    c.train.learning_rate = 1e-4     # AdamW learning rate (constant after warm-up)
    c.train.warmup_steps = 0         # linear warm-up steps
    c.train.weight_decay = 0.0       # AdamW decoupled weight decay
    c.train.b1 = 0.9                 # AdamW beta1
    c.train.b2 = 0.999               # AdamW beta2
    c.train.eps = 1e-8               # AdamW epsilon
    c.train.grad_clip_norm = 0.0     # clip the global gradient norm to this (0 = off)
    c.train.ema_decay = 0.9999       # EMA of params and model_state, updated every step
    c.train.log_every = 100          # steps between metric writes
    c.train.checkpoint_every = 10_000  # steps between checkpoints
    c.train.keep_checkpoints = 3     # how many recent checkpoints to keep
    c.train.async_checkpointing = True  # write checkpoints in the background
    c.train.sample_every = 10_000    # steps between EMA sample grids (0 = never)
    # A step whose loss or gradient norm is NaN/inf: "stop" (the run ends, naming the step and
    # the last finite checkpoint), "skip" (that update is dropped) or "warn" (log, go on).
    # A non-finite state is never saved, whatever this says.
    c.train.nonfinite = "stop"
    # Recompute blocks in the backward pass to save memory: "none" | "full" | "dots_saveable"
    # (keep the matmul outputs, recompute the elementwise work).
    c.train.remat_policy = "none"
    c.train.profile_steps = ""       # jax.profiler trace of these steps, e.g. "20-25" ("" = none)
    # Persistent XLA compilation cache, so that a restarted job does not compile again:
    # "workdir" = <workdir>/compilation_cache, "" = off, or a directory of its own.
    c.train.compilation_cache = "workdir"
    # Split each global batch into this many micro-batches, run one after the other inside the
    # step (lax.scan), with one optimizer update: the batch-256 recipes on fewer devices.
    c.train.grad_accum_steps = 1
    c.train.loss_buckets = 10        # log loss/t_bucket_k over K buckets of t (0 = off)
    # Weights & Biases: a project name turns it on; "online" | "offline" | "disabled".
    c.train.wandb_project = ""
    c.train.wandb_mode = "online"
    # Warm start: params from this checkpoint (a workdir, a step directory of one, or an
    # official .npz/.safetensors) with a fresh optimizer at step 0; ignored when the workdir
    # already has a checkpoint to resume. EMA: "checkpoint" (its EMA) | "params" (a copy).
    c.train.init_from = ""
    c.train.init_ema = "checkpoint"

    c.sample = ConfigDict()
    c.sample.num_samples = 64      # images per sample grid / --mode=sample
    c.sample.batch_size = 64       # images per sampling batch (global, over all devices)
    c.sample.sampler = "ddpm"      # gaussian: "ddpm" | "ddim"; flow: "euler" | "heun" | "dopri5"
    c.sample.num_steps = 250       # respaced sampling steps
    c.sample.eta = 0.0             # DDIM eta
    c.sample.atol = 1e-6           # dopri5 absolute tolerance (flow)
    c.sample.rtol = 1e-3           # dopri5 relative tolerance (flow)
    c.sample.cfg_scale = 4.0       # classifier-free guidance scale (1 = none)
    # Channels guided (0 = all; 3 = facebookresearch/DiT and DiffMoE-DDPM, whose samplers
    # guide only the first 3 latent channels; the rest come from the conditional pass).
    c.sample.cfg_channels = 0
    # "separate": conditional and unconditional batches in two model calls (official DiffMoE:
    # its experts then rank each half's tokens on their own); "joint": one doubled batch.
    c.sample.cfg_pool = "separate"
    c.sample.labels = ""           # comma-separated class labels ("" = cycle through classes)
    # Text models: a text file of prompts, one per line, encoded with text.encoder_dir ...
    c.sample.prompts = ""
    # ... or a val_captions.npz of precomputed caption states (python -m switch_dit_jax.data.coco)
    c.sample.captions_file = ""
    c.sample.clip_denoised = False  # clip predicted x0 to [-1, 1] (True for pixel data)
    c.sample.seed = 0              # sampling seed

    c.eval = ConfigDict()
    c.eval.eval_every = 0          # steps between in-training evaluations (0 = never)
    c.eval.num_samples = 1000      # EMA samples per evaluation (FID-N with N = this)
    c.eval.reference_npz = ""      # ADM reference batch / statistics .npz (non-digits data)
    c.eval.inception_weights = ""  # FID Inception weights .npz (see eval/inception.py)
    c.eval.batch_size = 200        # Inception feature batch size

    c.mesh = ConfigDict()
    c.mesh.data = -1     # data-parallel size (-1 = the devices left over)
    c.mesh.fsdp = 1      # parameter-sharding (FSDP) size
    # Expert-parallel size: mixture experts are split over it (it must divide ffn.num_experts)
    # and a DiffMoE pool spans its devices, i.e. global_batch / (data·fsdp) samples.
    c.mesh.expert = 1
    return c


def load_config(path: str, overrides: dict | None = None) -> ConfigDict:
    """`get_config()` of a config file (as `--config=path[:arg]` would), with dotted overrides:
    load_config("configs/quickstart.py", {"train.num_steps": 10})."""
    import importlib.util
    import os

    path, _, arg = path.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist; pass configs/NAME.py.")
    spec = importlib.util.spec_from_file_location(
        "config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    from switch_dit_jax.config_fields import unknown_field_message
    for dotted, value in (overrides or {}).items():
        message = unknown_field_message(config, dotted)
        if message:  # a ConfigError (a ValueError) with the nearest known name
            from switch_dit_jax.errors import ConfigError
            raise ConfigError(message)
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
