-- Dead features per run: latents that never fired on the evaluation tokens (freq = 0).
SELECT f.run_id, any_value(r.run_name) AS run_name, any_value(r.sae_arch) AS arch,
       count(*) AS d_sae,
       count(*) FILTER (WHERE f.freq = 0) AS dead,
       round(count(*) FILTER (WHERE f.freq = 0) / count(*), 4) AS dead_frac
FROM features f LEFT JOIN runs r USING (run_id)
GROUP BY f.run_id
ORDER BY dead_frac DESC, f.run_id
