"""Running an exported model (export_model.py's SavedModel or .tflite): test_model.py
model=PATH and the benchmarks use it.

    model = deployed.load("exported/pynet_level_0")
    rgb = model(mosaic)             # what its signature returns: uint8 (or float32) H' x W' x 3
"""

import os

import numpy as np
import tensorflow as tf

from checkpoints import RELEASED_ITERATION
from cli import UsageError, UserError
from render import crop_mosaic
from serving import SERVING


class Deployed:
    """An exported SavedModel or .tflite file. ``self(mosaic)`` returns what its signature
    returns (uint8 or float32 RGB); ``level``, ``iteration`` (the label of test_model.py's file
    names), ``float_output`` and ``size`` (the fixed mosaic size of a TFLite model, else None)
    describe it."""

    def __init__(self, path: str, threads: int = None):
        self.path = path
        if os.path.isdir(path):
            self._run, info, self.size, dtype = self._open_saved_model(path)
        elif os.path.isfile(path):
            self._run, info, self.size, dtype = self._open_tflite(path, threads or os.cpu_count() or 1)
        else:
            raise UserError(f"model={path}: no such SavedModel folder or .tflite file")
        self.level = int(info["level"])
        self.iteration = "None" if int(info["iteration"]) == RELEASED_ITERATION else str(int(info["iteration"]))
        self.float_output = np.dtype(dtype) != np.uint8

    @staticmethod
    def _open_saved_model(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise UserError(f"model={path}: a folder without saved_model.pb, not a SavedModel")
        try:
            loaded = tf.saved_model.load(path)
            serve = loaded.signatures[SERVING]
            info = {"level": loaded.level.numpy(), "iteration": loaded.iteration.numpy()}
        except (KeyError, AttributeError, ValueError, OSError, tf.errors.OpError) as exc:
            raise UserError(f"model={path}: not a SavedModel written by export_model.py "
                            f"({exc.__class__.__name__})") from None
        dtype = serve.structured_outputs["rgb"].dtype.as_numpy_dtype
        return (lambda mosaic: serve(mosaic=tf.constant(mosaic, tf.uint16))["rgb"].numpy()), info, None, dtype

    @staticmethod
    def _open_tflite(path, threads):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise UserError("running a .tflite model needs the LiteRT interpreter: pip install -r requirements.txt "
                            "(ai-edge-litert)") from None
        try:
            interpreter = Interpreter(model_path=path, num_threads=threads)
            serve = interpreter.get_signature_runner(SERVING)
            outputs = serve.get_output_details()
            # constant outputs: their values are in the file, readable before any run
            info = {key: interpreter.get_tensor(outputs[key]["index"]) for key in ("level", "iteration")}
            size = tuple(int(d) for d in serve.get_input_details()["mosaic"]["shape"])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise UserError(f"model={path}: not a TFLite model written by export_model.py "
                            f"({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__})") from None
        dtype = outputs["rgb"]["dtype"]
        return (lambda mosaic: serve(mosaic=np.ascontiguousarray(mosaic, np.uint16))["rgb"]), info, size, dtype

    def __call__(self, mosaic):
        mosaic = np.asarray(mosaic)
        if self.size is not None and mosaic.shape != self.size:
            raise UserError(f"model={self.path}: takes {self.size[0]}x{self.size[1]} mosaics, not "
                            f"{mosaic.shape[0]}x{mosaic.shape[1]} (export one with format=tflite "
                            f"size={mosaic.shape[0]}x{mosaic.shape[1]}, or a SavedModel, which takes any size)")
        return self._run(mosaic)

    def picture(self, mosaic, crop="none", progress=None):
        """render.render's contract: float32 (H', W', 3) for ``to_uint``. The picture is
        already clipped (and rounded to 8 bits, which ``to_uint(x, 8)`` gives back exactly)."""
        picture = self(crop_mosaic(mosaic, crop))
        if progress is not None:
            progress(picture.shape[0])
        return picture.astype(np.float32) / (255 if picture.dtype == np.uint8 else 1)


def load(path: str, threads: int = None) -> Deployed:
    return Deployed(path, threads)


def load_for_rendering(path: str, bits: int, stretch: bool) -> Deployed:
    """An exported model for test_model.py, refusing options its clipped output cannot honour."""
    if stretch:
        raise UsageError("stretch=true: needs the network's unclipped output, which an exported model does not "
                         "return (render from the checkpoint instead)")
    deployed = load(path)
    if bits == 16 and not deployed.float_output:
        raise UsageError(f"bits=16: {path} returns 8-bit pictures (export it with output_type=float)")
    return deployed
