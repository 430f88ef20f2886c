-- Features that split between widths, the largest families first; $1 = the study's parent run id
SELECT small_d_sae, large_d_sae, parent, n_children,
       list(child ORDER BY rank) AS children,
       list(round(cos, 3) ORDER BY rank) AS cosines
FROM feature_splits
WHERE study = $1
GROUP BY small_d_sae, large_d_sae, parent, n_children
HAVING n_children >= 2
ORDER BY n_children DESC, small_d_sae, parent
