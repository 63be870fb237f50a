"""ResNet-18 + FPCM, PGD-AT on CIFAR-10 in the L2 threat model (eps 0.5).

    python main.py --config configs/cifar10_resnet18_l2.py --workdir runs/cifar10_resnet18_l2
    python main.py --config configs/cifar10_resnet18_l2.py --workdir runs/cifar10_resnet18_l2 \
        --mode eval --attack none,pgd50,autoattack

The official recipe (lr 0.01, wd 3.5e-3, 120 epochs, PGD-10 training attack) with the attack in
L2: eps 0.5 (RobustBench's and AutoAttack's L2 radius), step 0.1 = 2 eps / 10 steps (the TRADES
code's L2 step rule), normalised-gradient steps projected onto the L2 ball and [0, 1]; validation
and evaluation in L2 too. The paper reports L-inf only. Baseline without FPCM:
--config.model.fpcm=False. Cost: as configs/cifar10_resnet18.py (120 epochs x 49,000 images x 11
forward-backward passes); an L2 step costs the same as an L-inf one.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.attack.norm = "l2"
    config.attack.eps = 0.5
    config.attack.step_size = 0.1
    return config
