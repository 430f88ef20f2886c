-- Features whose top examples activate on the token $1 (marked «token» in the example text).
-- saeflow sql features_with_token --param ' def'
SELECT run_id, feature_id, count(*) AS hits, max(activation) AS max_activation,
       arg_max(text, activation) AS best_example
FROM examples
WHERE contains(text, '«' || $1 || '»')
GROUP BY run_id, feature_id
ORDER BY hits DESC, max_activation DESC, run_id, feature_id
LIMIT 50
