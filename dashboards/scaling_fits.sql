-- A scaling study's power laws (y ≈ coef · C^exponent) and their value at the extrapolated budget; $1 = the study's parent run id
SELECT quantity, round(exponent, 4) AS exponent,
       round(exponent_lo, 4) AS lo, round(exponent_hi, 4) AS hi,
       n_points, coef, budget, at_budget, fixed_sparsity
FROM scaling_fits
WHERE study = $1
ORDER BY quantity
