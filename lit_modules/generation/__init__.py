"""Generation: the class-balancing GAN (CBGAN, UAI 2021) and its metrics.

- :mod:`lit_modules.generation.class_balance`: the regulariser (pure functions + :class:`ClassBalanceState`);
- :mod:`lit_modules.generation.gan_losses`: GAN losses and the players' gradient steps;
- :mod:`lit_modules.generation.metrics`: FID / KID on the packaged InceptionV3, domain FID, class histogram;
- :mod:`lit_modules.generation.evaluation`: :class:`GenerationEvaluation`, the callback measuring the samples;
- :mod:`lit_modules.generation.cbgan`: the LightningModule :class:`ClassBalancingGAN`.
"""

from lit_modules.generation.cbgan import ClassBalancingGAN
from lit_modules.generation.class_balance import (
                                                  ClassBalanceState,
                                                  class_balance_loss,
                                                  class_weights,
                                                  hard_counts,
                                                  update_effective_counts,
)
from lit_modules.generation.evaluation import GenerationEvaluation

__all__ = ["ClassBalanceState", "ClassBalancingGAN", "GenerationEvaluation", "class_balance_loss", "class_weights",
           "hard_counts", "update_effective_counts"]
