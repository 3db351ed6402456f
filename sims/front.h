/*
 * The truth of the `front` example: a steep front along a wavy curve in the unit square,
 *
 *     u(x, y) = tanh((y - c(x)) / w),   c(x) = 0.5 + 0.2 sin(2 pi x),
 *
 * flat (+-1) almost everywhere, with all of its variation in a band of width ~w
 * around the curve. Shared by sim-front-check and sim-front-gen.
 */
#ifndef FRONT_H
#define FRONT_H
#include <math.h>

static inline double front_value(double x, double y, double width) {
    double c = 0.5 + 0.2 * sin(2.0 * M_PI * x);
    return tanh((y - c) / width);
}
#endif
