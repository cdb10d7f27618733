"""prefix: a preemption-tolerant distributed training daemon."""
