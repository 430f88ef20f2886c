-- The sparsity-fidelity frontier: L0 against explained variance and loss recovered, per run.
SELECT run_id, run_name, sae_arch AS arch, sae_d_sae AS d_sae,
       eval_l0 AS l0, eval_explained_variance AS explained_variance,
       eval_loss_recovered AS loss_recovered
FROM runs
WHERE eval_l0 IS NOT NULL
ORDER BY l0, run_id
