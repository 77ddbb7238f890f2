"""The compiled steps of training: one optimizer step (with optional gradient accumulation) and
one evaluation, on one device or under a tf.distribute strategy."""

import time

import keras
import tensorflow as tf

import cluster
import losses
from adam import reference_adam


def build_optimizer(args):
    """Adam as the reference's tf.train.AdamOptimizer: beta1 0.9, beta2 0.999, epsilon 1e-8."""
    optimizer = reference_adam(learning_rate=args["learning_rate"], beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    if args["mixed_precision"]:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def base_optimizer(optimizer):
    """The Adam inside a LossScaleOptimizer (its state is what a checkpoint keeps)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


class Steps:
    """The compiled training step (with optional gradient accumulation) and evaluation step.

    Under a strategy each replica's loss is the sum of its per-image losses divided by the
    GLOBAL batch size (batch_size), so that the all-reduced (summed) gradient, and the sum over
    accumulation steps, equal the gradient of the batch mean on one device. On one device
    the steps call the replica function directly: no strategy.run / reduce in the graph.
    """

    def __init__(self, strategy, view, optimizer, level, vgg, batch_size, accum_steps, mixed_precision, xla=False,
                 distributed=None, loss_kind="reference"):
        self.strategy, self.view, self.optimizer = strategy, view, optimizer
        self.level, self.vgg, self.accum_steps = level, vgg, accum_steps
        self.global_batch = float(batch_size)
        self.mixed = mixed_precision
        self.trainable = view.trainable_variables
        self.accumulators = None
        if distributed is None:
            distributed = strategy.num_replicas_in_sync > 1 or cluster.task_count() > 1
        if accum_steps > 1:
            with strategy.scope():
                # one local sum per replica (ON_READ), all-reduced by the optimizer when applied
                self.accumulators = [
                    tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                                synchronization=tf.VariableSynchronization.ON_READ,
                                aggregation=tf.VariableAggregation.SUM, name=f"accum_{i}")
                    for i, v in enumerate(self.trainable)]
        sum_ = tf.distribute.ReduceOp.SUM

        def loss_and_grads(raw, target):
            with tf.GradientTape() as tape:
                enhanced = view(raw, training=True)
                per_image, _ = losses.level_loss_per_image(level, enhanced, target, vgg, vgg is not None,
                                                           loss_kind)
                loss = tf.reduce_sum(per_image) / self.global_batch
                scaled = optimizer.scale_loss(loss) if self.mixed else loss
            return loss, tape.gradient(scaled, self.trainable)

        def replica_step(raw, target):
            loss, grads = loss_and_grads(raw, target)
            optimizer.apply_gradients(zip(grads, self.trainable))
            return loss

        def replica_accumulate(raw, target):
            loss, grads = loss_and_grads(raw, target)
            for acc, grad in zip(self.accumulators, grads):
                acc.assign_add(grad)
            return loss

        def replica_apply():
            grads = [acc.read_value() for acc in self.accumulators]
            optimizer.apply_gradients(zip(grads, self.trainable))
            with tf.control_dependencies(grads):
                for acc in self.accumulators:
                    acc.assign(tf.zeros_like(acc))

        def compiled(fn):
            return tf.function(fn, jit_compile=xla or None)

        if distributed:
            step = compiled(lambda batch: strategy.reduce(sum_, strategy.run(replica_step, args=batch), axis=None))
            accumulate = compiled(
                lambda batch: strategy.reduce(sum_, strategy.run(replica_accumulate, args=batch), axis=None))
            apply = compiled(lambda: strategy.run(replica_apply))
        else:
            step = compiled(lambda batch: replica_step(*batch))
            accumulate = compiled(lambda batch: replica_accumulate(*batch))
            apply = compiled(replica_apply)

        @compiled
        def evaluate(raw, target):
            enhanced = tf.cast(view(raw, training=False), tf.float32)
            total, parts = losses.level_loss(level, enhanced, target, vgg, vgg is not None, loss_kind)
            out = {"loss": total, "mse": parts["mse"], "psnr": losses.psnr_from_mse(parts["mse"])}
            if vgg is not None:
                out["content"] = parts["content"] if "content" in parts else losses.content_loss(vgg, enhanced, target)
            ms = losses.ms_ssim(enhanced, target)
            if ms is not None:
                out["ms_ssim"] = ms
            return out

        self._step, self._accumulate, self._apply = step, accumulate, apply
        self.evaluate = evaluate

    def train_step(self, next_input):
        """One optimizer step; ``next_input()`` returns the next (distributed) micro-batch.
        Returns (loss of the batch as a float, seconds spent waiting for input)."""
        waited, total = 0.0, 0.0
        if self.accumulators is None:
            t0 = time.perf_counter()
            batch = next_input()
            waited += time.perf_counter() - t0
            return float(self._step(batch)), waited
        for _ in range(self.accum_steps):
            t0 = time.perf_counter()
            batch = next_input()
            waited += time.perf_counter() - t0
            total += float(self._accumulate(batch))
        self._apply()
        return total, waited
