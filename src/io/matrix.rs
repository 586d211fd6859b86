//! Row-major byte matrices assembled from slices of mapped files without copying: the row
//! and column slices and concatenations the bridge's mapping table applies (fused QKV per
//! group, gated `[gate; up]`, TP row/column splits, vocabulary padding) become a list of
//! byte ranges that the writer streams straight from the source map into the output file.
//!
//! A tensor of shape `[r, c…]` is a matrix of `r` rows of `∏c · elem` bytes (1-D: rows of
//! one element). Offsets are in bytes, so the matrix is dtype-agnostic.

use anyhow::{bail, Result};
use memmap2::Mmap;

/// A contiguous piece of output: bytes borrowed from a source (with the map they lie in, so
/// a writer can release their pages once written), or zeros (padded vocab rows).
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    Bytes(&'a [u8], Option<&'a Mmap>),
    Zeros(usize),
}

#[derive(Debug, Clone, Copy)]
enum Src<'a> {
    /// Row `i` of this part is `base[i * stride..][..width]`; `map` holds `base` if mapped.
    Data {
        base: &'a [u8],
        stride: usize,
        map: Option<&'a Mmap>,
    },
    Zeros,
}

#[derive(Debug, Clone)]
struct Part<'a> {
    src: Src<'a>,
    /// Bytes this part contributes to every row.
    width: usize,
}

/// `rows` rows, each the concatenation of one row of every part.
#[derive(Debug, Clone)]
struct Run<'a> {
    rows: usize,
    parts: Vec<Part<'a>>,
}

/// A byte matrix: runs of rows stacked vertically.
#[derive(Debug, Clone)]
pub struct Matrix<'a> {
    row_bytes: usize,
    runs: Vec<Run<'a>>,
}

impl<'a> Matrix<'a> {
    /// A contiguous row-major tensor of `shape` with `elem`-byte elements.
    pub fn of_tensor(data: &'a [u8], shape: &[usize], elem: usize) -> Result<Self> {
        Self::of_bytes(data, None, shape, elem)
    }

    /// [`Self::of_tensor`] for bytes lying in `map`.
    pub fn of_mapped(data: &'a [u8], map: &'a Mmap, shape: &[usize], elem: usize) -> Result<Self> {
        Self::of_bytes(data, Some(map), shape, elem)
    }

    fn of_bytes(
        data: &'a [u8],
        map: Option<&'a Mmap>,
        shape: &[usize],
        elem: usize,
    ) -> Result<Self> {
        let rows = shape.first().copied().unwrap_or(1);
        let row_bytes = shape.iter().skip(1).product::<usize>() * elem;
        if rows * row_bytes != data.len() {
            bail!(
                "shape {shape:?} of {elem}-byte elements needs {} bytes, got {}",
                rows * row_bytes,
                data.len()
            );
        }
        let runs = if rows == 0 || row_bytes == 0 {
            Vec::new()
        } else {
            vec![Run {
                rows,
                parts: vec![Part {
                    src: Src::Data { base: data, stride: row_bytes, map },
                    width: row_bytes,
                }],
            }]
        };
        Ok(Matrix { row_bytes, runs })
    }

    /// `rows` rows of `row_bytes` zero bytes.
    pub fn zeros(rows: usize, row_bytes: usize) -> Self {
        let runs = if rows == 0 || row_bytes == 0 {
            Vec::new()
        } else {
            vec![Run { rows, parts: vec![Part { src: Src::Zeros, width: row_bytes }] }]
        };
        Matrix { row_bytes, runs }
    }

    pub fn rows(&self) -> usize {
        self.runs.iter().map(|r| r.rows).sum()
    }

    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.rows() * self.row_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `start..start + n`.
    pub fn select_rows(&self, start: usize, n: usize) -> Result<Self> {
        if start + n > self.rows() {
            bail!("rows {start}..{} out of range (matrix has {})", start + n, self.rows());
        }
        let (end, mut at, mut runs) = (start + n, 0, Vec::new());
        for run in &self.runs {
            let (lo, hi) = (start.max(at), end.min(at + run.rows));
            if lo < hi {
                let (lo, hi) = (lo - at, hi - at);
                let parts = run
                    .parts
                    .iter()
                    .map(|p| {
                        let src = match p.src {
                            Src::Data { base, stride, map } => Src::Data {
                                base: &base[lo * stride..(hi - 1) * stride + p.width],
                                stride,
                                map,
                            },
                            Src::Zeros => Src::Zeros,
                        };
                        Part { src, width: p.width }
                    })
                    .collect();
                runs.push(Run { rows: hi - lo, parts });
            }
            at += run.rows;
        }
        Ok(Matrix { row_bytes: self.row_bytes, runs })
    }

    /// Byte columns `start..start + len` of every row.
    pub fn select_cols(&self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.row_bytes {
            bail!(
                "columns {start}..{} out of range (rows have {} bytes)",
                start + len,
                self.row_bytes
            );
        }
        let end = start + len;
        let runs = self
            .runs
            .iter()
            .map(|run| {
                let mut c = 0;
                let mut parts = Vec::new();
                for p in &run.parts {
                    let (lo, hi) = (start.max(c), end.min(c + p.width));
                    if lo < hi {
                        let (o, w) = (lo - c, hi - lo);
                        let src = match p.src {
                            Src::Data { base, stride, map } => Src::Data {
                                base: &base[o..(run.rows - 1) * stride + o + w],
                                stride,
                                map,
                            },
                            Src::Zeros => Src::Zeros,
                        };
                        parts.push(Part { src, width: w });
                    }
                    c += p.width;
                }
                Run { rows: run.rows, parts }
            })
            .filter(|r| !r.parts.is_empty())
            .collect();
        Ok(Matrix { row_bytes: len, runs })
    }

    /// Stacks matrices of equal row width (dim-0 concatenation).
    pub fn vcat(mats: Vec<Matrix<'a>>) -> Result<Self> {
        let mats: Vec<Matrix> = mats.into_iter().filter(|m| m.rows() > 0).collect();
        let Some(row_bytes) = mats.first().map(|m| m.row_bytes) else {
            return Ok(Matrix { row_bytes: 0, runs: Vec::new() });
        };
        if let Some(m) = mats.iter().find(|m| m.row_bytes != row_bytes) {
            bail!("cannot stack rows of {} and {} bytes", row_bytes, m.row_bytes);
        }
        Ok(Matrix { row_bytes, runs: mats.into_iter().flat_map(|m| m.runs).collect() })
    }

    /// Joins matrices of equal row count side by side (dim-1 concatenation).
    pub fn hcat(mats: Vec<Matrix<'a>>) -> Result<Self> {
        let Some(rows) = mats.first().map(|m| m.rows()) else {
            return Ok(Matrix { row_bytes: 0, runs: Vec::new() });
        };
        if let Some(m) = mats.iter().find(|m| m.rows() != rows) {
            bail!("cannot join matrices of {rows} and {} rows side by side", m.rows());
        }
        let row_bytes = mats.iter().map(|m| m.row_bytes).sum();
        // Cut every input at the union of all run boundaries, so each piece is one run.
        let mut cuts: Vec<usize> = mats
            .iter()
            .flat_map(|m| {
                m.runs.iter().scan(0, |at, r| {
                    *at += r.rows;
                    Some(*at)
                })
            })
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut runs = Vec::new();
        let mut a = 0;
        for b in cuts {
            let mut parts = Vec::new();
            for m in &mats {
                for run in m.select_rows(a, b - a)?.runs {
                    parts.extend(run.parts);
                }
            }
            runs.push(Run { rows: b - a, parts });
            a = b;
        }
        Ok(Matrix { row_bytes, runs })
    }

    /// Visits the matrix's bytes in row-major order as the largest contiguous pieces its
    /// structure allows (a plain tensor or row range is one piece).
    pub fn for_each_piece(&self, f: &mut dyn FnMut(Piece<'a>) -> Result<()>) -> Result<()> {
        for run in &self.runs {
            let all_zero = run.parts.iter().all(|p| matches!(p.src, Src::Zeros));
            match run.parts.as_slice() {
                _ if all_zero => f(Piece::Zeros(run.rows * self.row_bytes))?,
                [Part { src: Src::Data { base, stride, map }, width }] if stride == width => {
                    f(Piece::Bytes(&base[..run.rows * width], *map))?
                }
                parts => {
                    for i in 0..run.rows {
                        for p in parts {
                            match p.src {
                                Src::Data { base, stride, map } => {
                                    f(Piece::Bytes(&base[i * stride..i * stride + p.width], map))?
                                }
                                Src::Zeros => f(Piece::Zeros(p.width))?,
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The bytes, copied (tests and small tensors).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        let _ = self.for_each_piece(&mut |p| {
            match p {
                Piece::Bytes(b, _) => out.extend_from_slice(b),
                Piece::Zeros(n) => out.resize(out.len() + n, 0),
            }
            Ok(())
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn bytes(t: &Tensor) -> Vec<u8> {
        t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
    }

    #[test]
    fn slices_and_concatenations_match_candle() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0u8, 48, &dev).unwrap().reshape((8, 6)).unwrap();
        let b = Tensor::arange(100u8, 124, &dev).unwrap().reshape((4, 6)).unwrap();
        let (da, db) = (bytes(&a), bytes(&b));
        let ma = Matrix::of_tensor(&da, &[8, 6], 1).unwrap();
        let mb = Matrix::of_tensor(&db, &[4, 6], 1).unwrap();
        assert_eq!(ma.select_rows(2, 3).unwrap().to_vec(), bytes(&a.narrow(0, 2, 3).unwrap()));
        assert_eq!(ma.select_cols(1, 4).unwrap().to_vec(), bytes(&a.narrow(1, 1, 4).unwrap()));
        let v = Matrix::vcat(vec![ma.clone(), mb.clone(), Matrix::zeros(2, 6)]).unwrap();
        let z = Tensor::zeros((2, 6), candle_core::DType::U8, &dev).unwrap();
        let want = Tensor::cat(&[&a, &b, &z], 0).unwrap();
        assert_eq!(v.to_vec(), bytes(&want));
        // Rows and columns of a stacked matrix cross run boundaries.
        assert_eq!(v.select_rows(6, 5).unwrap().to_vec(), bytes(&want.narrow(0, 6, 5).unwrap()));
        let cols = v.select_cols(2, 3).unwrap().select_rows(7, 6).unwrap();
        assert_eq!(cols.to_vec(), bytes(&want.narrow(1, 2, 3).unwrap().narrow(0, 7, 6).unwrap()));
        // Side by side, with different run structures on the two sides.
        let left = Matrix::vcat(vec![ma.select_cols(0, 2).unwrap(), mb.select_cols(0, 2).unwrap()])
            .unwrap();
        let h = Matrix::hcat(vec![left, v.select_cols(3, 3).unwrap().select_rows(0, 12).unwrap()])
            .unwrap();
        let ab = Tensor::cat(&[&a, &b], 0).unwrap();
        let want_h =
            Tensor::cat(&[&ab.narrow(1, 0, 2).unwrap(), &ab.narrow(1, 3, 3).unwrap()], 1).unwrap();
        assert_eq!(h.to_vec(), bytes(&want_h));
        assert_eq!(h.len(), 60);
        // A plain tensor is one piece; errors for out-of-range slices.
        let mut n = 0;
        ma.for_each_piece(&mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 1);
        assert!(ma.select_rows(7, 2).is_err());
        assert!(ma.select_cols(5, 2).is_err());
        assert!(Matrix::hcat(vec![ma, mb]).is_err());
        assert!(Matrix::of_tensor(&da, &[7, 6], 1).is_err());
    }
}
