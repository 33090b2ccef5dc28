"""Text-to-image person retrieval (GCKD): the ALBEF-style backbone, checkpoints, feature heads, the GCKD
trainer, evaluation and end-to-end runs (docs/gckd.md).

Names are imported lazily so that ``import crossret.textimage`` imports neither torch nor transformers.
"""

from __future__ import annotations

from crossret.lazy_exports import lazy_getattr

_EXPORTS = {
    "AlbefConfig": "crossret.textimage.albef",
    "AlbefFeatures": "crossret.textimage.albef",
    "AlbefModel": "crossret.textimage.albef",
    "ema_update": "crossret.textimage.albef",
    "interpolate_pos_embed": "crossret.textimage.albef",
    "momentum_copy": "crossret.textimage.albef",
    "Backbone": "crossret.textimage.backbone",
    "MaskedLanguageBackbone": "crossret.textimage.backbone",
    "AlbefCheckpoint": "crossret.textimage.checkpoint",
    "AlbefStateMapping": "crossret.textimage.checkpoint",
    "albef_state_to_model": "crossret.textimage.checkpoint",
    "load_albef_checkpoint": "crossret.textimage.checkpoint",
    "model_to_albef_state": "crossret.textimage.checkpoint",
    "save_albef_checkpoint": "crossret.textimage.checkpoint",
    "FeatureHeadsConfig": "crossret.textimage.feature_heads",
    "FeatureHeadsFeatures": "crossret.textimage.feature_heads",
    "FeatureHeadsModel": "crossret.textimage.feature_heads",
    "DeltaCalibration": "crossret.textimage.calibration",
    "calibrate_delta": "crossret.textimage.calibration",
    "GckdConfig": "crossret.textimage.gckd",
    "GckdTrainer": "crossret.textimage.gckd",
    "FeatureTrainingData": "crossret.textimage.streams",
    "PersonTrainingData": "crossret.textimage.streams",
    "StepBatch": "crossret.textimage.streams",
    "CaptionTokenizer": "crossret.textimage.tokenize",
    "load_bert_vocab": "crossret.textimage.tokenize",
    "mask_tokens": "crossret.textimage.tokenize",
    "train_wordpiece_vocab": "crossret.textimage.tokenize",
    "evaluate_model": "crossret.textimage.evaluate",
    "GckdRunConfig": "crossret.textimage.pipeline",
    "evaluate_run": "crossret.textimage.pipeline",
    "run_gckd": "crossret.textimage.pipeline",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("crossret.textimage", _EXPORTS)
