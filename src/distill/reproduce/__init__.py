"""Paper reproductions on the analytic prior: ``python -m distill.reproduce fig2_1|kappa_study|main_job|ism_study``.

fig2_1       one prompt, >= 4 seeds: DDIM sampling (CFG 7.5), cached kappa, SDS (CFG 7.5 and 100), SDI (official and
             paper jump) under the official 2D notebook protocol and the small-step protocol; PNG + table of
             ground-truth metrics (commitment, contrast, gamut, realism) (paper Fig. 2.1).
kappa_study  residual of eq. 4.4 (x0 units) of each kappa strategy over t (paper Fig. 6.3 right);
             CSV + plot.
main_job     the main job (``python train.py``) for seeds 0..N-1: a table of the prior's ground-truth metrics per
             seed with median and range (main_job_seeds.md / .csv) and all final frames (main_job_seeds.png).
             Runs resume from outputs/reproduce/main_job/seed_<k>; ``--set key=value`` adds config overrides.
ism_study    SDS vs SDI vs ISM (LucidDreamer) on the exact 2D and 3D priors, same seeds: ground-truth metrics
             (PSNR to the nearest true object, mode commitment, texture realism per band, gamut) + PNG.
Outputs go to --out (default docs/); runs to outputs/reproduce/.

One module per study (fig2_1.py, kappa_study.py, main_job.py, ism_study.py), what they share in common.py, the CLI
in __main__.py.
"""
