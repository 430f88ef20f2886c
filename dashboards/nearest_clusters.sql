-- Clusters of run $1's features by decoder direction (cluster_id: spherical k-means over W_dec),
-- largest first, each with its most frequent members and their top promoted token.
SELECT cluster_id, count(*) AS size, round(avg(freq), 5) AS mean_freq,
       list(feature_id ORDER BY freq DESC, feature_id)[1:8] AS top_features,
       list(top_logits[1] ORDER BY freq DESC, feature_id)[1:8] AS top_logit,
       round(max(nearest_cos), 3) AS max_nearest_cos
FROM features
WHERE run_id = $1
GROUP BY cluster_id
ORDER BY size DESC, cluster_id
