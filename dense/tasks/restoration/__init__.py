"""Image restoration: super-resolution (×2, ×4) and deblurring, one module per concern.

==================  ===========================================================================
``resize``          MATLAB's bicubic ``imresize`` (the SR benchmarks' degradation)
``metrics``         PSNR and SSIM on Y (the SR papers' protocol), gradient energy (sharpness)
``degradations``    the SR pair, blur kernels (camera shake, motion, defocus, Gaussian, banks),
                    blur with noise, JPEG
``inference``       tiles with an out-of-memory fallback, ``restore``, self-ensemble, the
                    baselines as models, ``load_restorer``
``data``            training images and patches (SR and deblurring batches, the lab's aligned
                    pairs)
``evaluation``      evaluation sets and PSNR/SSIM-Y evaluations
``training``        L2 and GAN training on the shared loop (``dense.train.train_loop``)
``cards``           a run → a bundled model folder, benchmarked, with its card
``cli``             ``dense predict|train|eval|export sr|deblur`` (and ``train gan``)
==================  ===========================================================================

The names below are the package's public API (``from dense.tasks import restoration as R``,
then ``R.restore``, ``R.psnr_y`` ...). Code that replaces one of them for a test patches the
module that defines it (``dense.tasks.restoration.inference``), where its callers look it up.
"""

from dense.tasks.restoration.cards import (
    PUBLISHED,
    WIENER_ROW,
    export_model,
    export_run,
    measure,
)
from dense.tasks.restoration.cli import (
    add_eval_parser,
    add_export_parser,
    add_predict_parser,
    add_train_parser,
    check_predict_options,
    load_for_predict,
    predict_one,
    predict_options,
)
from dense.tasks.restoration.data import (
    IMAGE_SUFFIXES,
    PatchSampler,
    deblur_batch,
    image_files,
    load_training_images,
    pair_batches,
    sr_batch,
    to_batch,
    training_pairs,
)
from dense.tasks.restoration.deconvolution import wiener_deblur
from dense.tasks.restoration.degradations import (
    BLUR_KINDS,
    blur_kernel,
    defocus_kernel,
    degrade_blur,
    degrade_sr,
    gaussian_kernel,
    jpeg_roundtrip,
    linear_motion_kernel,
    load_kernels,
    mod_crop,
    motion_kernel,
    random_kernel,
    sr_pair,
    synthetic_eval_kernels,
)
from dense.tasks.restoration.evaluation import (
    BlurredImage,
    deblur_eval_set,
    evaluate_deblur,
    evaluate_sr,
    evaluate_wiener,
    sr_pairs,
)
from dense.tasks.restoration.inference import (
    DEBLUR_TASK,
    MIN_TILE,
    OVERLAP,
    SR_TASK,
    TILE,
    TILE_INPUT,
    BicubicUpscaler,
    Identity,
    SelfEnsemble,
    context_pixels,
    load_restorer,
    log,
    model_scale,
    restore,
    run_tiled,
    tile_spans,
    to_tensor,
    to_uint8,
)
from dense.tasks.restoration.metrics import gradient_energy, psnr_y, rgb_to_y, score, ssim_y
from dense.tasks.restoration.resize import matlab_imresize, resize_matrix
from dense.tasks.restoration.training import (
    RestorationTask,
    build_generator,
    discriminator_step,
    export_best,
    generator_step,
    set_requires_grad,
    train_gan,
    train_restoration,
)

__all__ = [
    "BLUR_KINDS", "DEBLUR_TASK", "IMAGE_SUFFIXES", "MIN_TILE", "OVERLAP", "PUBLISHED", "SR_TASK",
    "TILE", "TILE_INPUT",
    "WIENER_ROW",
    "BicubicUpscaler", "BlurredImage", "Identity", "PatchSampler", "RestorationTask",
    "SelfEnsemble",
    "add_eval_parser", "add_export_parser", "add_predict_parser", "add_train_parser",
    "blur_kernel", "build_generator", "check_predict_options", "context_pixels",
    "deblur_batch", "deblur_eval_set", "defocus_kernel", "degrade_blur", "degrade_sr",
    "discriminator_step", "evaluate_deblur", "evaluate_sr", "evaluate_wiener", "export_best",
    "export_model",
    "export_run", "gaussian_kernel", "generator_step", "gradient_energy", "image_files",
    "jpeg_roundtrip", "linear_motion_kernel", "load_for_predict", "load_kernels",
    "load_restorer", "load_training_images", "log", "matlab_imresize", "measure", "mod_crop",
    "model_scale", "motion_kernel", "pair_batches", "predict_one", "predict_options", "psnr_y",
    "random_kernel", "resize_matrix", "restore", "rgb_to_y", "run_tiled", "score",
    "set_requires_grad", "sr_batch", "sr_pair", "sr_pairs", "ssim_y", "synthetic_eval_kernels",
    "tile_spans",
    "to_batch", "to_tensor", "to_uint8", "train_gan", "train_restoration", "training_pairs",
    "wiener_deblur",
]
