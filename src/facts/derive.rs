//! Values trialgate computes rather than reads: eGFR by CKD-EPI 2021 and BMI.

/// eGFR (mL/min/1.73 m²) by the race-free CKD-EPI 2021 creatinine equation
/// (Inker LA et al., NEJM 2021;385:1737-49). `scr` is serum creatinine in mg/dL; the equation
/// is validated for adults only, which callers enforce.
pub fn ckd_epi_2021(scr_mg_dl: f64, age_years: i64, female: bool) -> f64 {
    let (kappa, alpha, sex) = if female { (0.7, -0.241, 1.012) } else { (0.9, -0.302, 1.0) };
    let r = scr_mg_dl / kappa;
    142.0 * r.min(1.0).powf(alpha) * r.max(1.0).powf(-1.200) * 0.9938f64.powi(age_years as i32) * sex
}

/// Body-mass index (kg/m²) from weight in kg and height in cm.
pub fn bmi(weight_kg: f64, height_cm: f64) -> f64 {
    let m = height_cm / 100.0;
    weight_kg / (m * m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published values: NKF calculator (1.09 mg/dL, 55 y, male -> 80; 1.2 -> 71) and the
    /// other vectors of codes.md section 4.
    #[test]
    fn ckd_epi_2021_matches_published_values() {
        let cases = [
            (1.09, 55, false, 80.2),
            (1.2, 55, false, 71.4),
            (1.0, 40, true, 73.0),
            (0.6, 25, true, 127.7),
            (2.0, 30, false, 45.2),
            (1.5, 50, true, 42.2),
        ];
        for (scr, age, female, want) in cases {
            let got = ckd_epi_2021(scr, age, female);
            assert!((got - want).abs() < 0.05, "scr {scr} age {age} female {female}: {got} != {want}");
        }
        assert_eq!(ckd_epi_2021(1.09, 55, false).round(), 80.0);
        assert_eq!(ckd_epi_2021(1.2, 55, false).round(), 71.0);
    }

    #[test]
    fn bmi_from_weight_and_height() {
        assert!((bmi(70.0, 175.0) - 22.857).abs() < 0.001);
    }
}
