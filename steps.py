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
    if args["precision"] == "fp16":  # float16's range needs the loss scaled; bfloat16 has float32's
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
    the steps call the replica methods directly: no strategy.run / reduce in the graph.
    """

    def __init__(self, strategy, view, optimizer, level, vgg, batch_size, accum_steps, precision="fp32", xla=False,
                 distributed=None, loss_kind="reference"):
        self.strategy, self.view, self.optimizer = strategy, view, optimizer
        self.level, self.vgg, self.accum_steps, self.loss_kind = level, vgg, accum_steps, loss_kind
        self.global_batch = float(batch_size)
        self.scaled = precision == "fp16"
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
        compiled = lambda fn: tf.function(fn, jit_compile=xla or None)
        if distributed:
            self._step = compiled(self.distributed_step)
            self._accumulate = compiled(self.distributed_accumulate)
            self._apply = compiled(self.distributed_apply)
        else:
            self._step = compiled(self.local_step)
            self._accumulate = compiled(self.local_accumulate)
            self._apply = compiled(self.replica_apply)
        self._evaluate = compiled(self.evaluate_batch)

    # -- what each replica runs (in a graph) ---------------------------------------------------

    def loss_and_grads(self, raw, target):
        with tf.GradientTape() as tape:
            enhanced = self.view(raw, training=True)
            per_image, _ = losses.level_loss_per_image(self.level, enhanced, target, self.vgg, self.vgg is not None,
                                                       self.loss_kind)
            loss = tf.reduce_sum(per_image) / self.global_batch
            scaled = self.optimizer.scale_loss(loss) if self.scaled else loss
        grads = tape.gradient(scaled, self.trainable)
        # in reduced precision the biases before instance norm are left out (model.ConvLayer):
        # their gradient, zero in exact arithmetic, is then None
        return loss, [tf.zeros_like(v) if g is None else g for v, g in zip(self.trainable, grads)]

    def replica_step(self, raw, target):
        loss, grads = self.loss_and_grads(raw, target)
        self.optimizer.apply_gradients(zip(grads, self.trainable))
        return loss

    def replica_accumulate(self, raw, target):
        loss, grads = self.loss_and_grads(raw, target)
        for acc, grad in zip(self.accumulators, grads):
            acc.assign_add(grad)
        return loss

    def replica_apply(self):
        grads = [acc.read_value() for acc in self.accumulators]
        self.optimizer.apply_gradients(zip(grads, self.trainable))
        with tf.control_dependencies(grads):
            for acc in self.accumulators:
                acc.assign(tf.zeros_like(acc))

    def evaluate_batch(self, raw, target):
        enhanced = tf.cast(self.view(raw, training=False), tf.float32)
        vgg = self.vgg
        total, parts = losses.level_loss(self.level, enhanced, target, vgg, vgg is not None, self.loss_kind)
        out = {"loss": total, "mse": parts["mse"], "psnr": losses.psnr_from_mse(parts["mse"])}
        if vgg is not None:
            out["content"] = parts["content"] if "content" in parts else losses.content_loss(vgg, enhanced, target)
        ms = losses.ms_ssim(enhanced, target)
        if ms is not None:
            out["ms_ssim"] = ms
        return out

    # -- one device: the replica methods themselves; a strategy: run on every replica, summed --

    def local_step(self, batch):
        return self.replica_step(*batch)

    def local_accumulate(self, batch):
        return self.replica_accumulate(*batch)

    def _summed(self, replica_fn, batch):
        per_replica = self.strategy.run(replica_fn, args=batch)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def distributed_step(self, batch):
        return self._summed(self.replica_step, batch)

    def distributed_accumulate(self, batch):
        return self._summed(self.replica_accumulate, batch)

    def distributed_apply(self):
        self.strategy.run(self.replica_apply)

    # -- called by the trainer -----------------------------------------------------------------

    def evaluate(self, raw, target):
        """The level's loss and metrics of one test batch (compiled)."""
        return self._evaluate(raw, target)

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
