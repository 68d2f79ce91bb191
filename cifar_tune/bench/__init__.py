"""``cifar-tune bench``: training throughput, search efficiency, ops per step, packed trials."""
